"""Tokenizers, offline: a WordPiece tokenizer trained on the caption corpus, or any local HF fast tokenizer.

`CaptionTokenizer` turns captions (+ keyword character spans from the shard metadata) into token ids, an
attention mask and a keyword mask: the tokens the reconstruction loss always masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "[DEC]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096) -> Path:
    """Train an uncased BERT-style WordPiece tokenizer and save it as a HF fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   additional_special_tokens=["[ENC]", "[DEC]"])
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path):
    """A local HF fast tokenizer, with [ENC] and [DEC] added when it lacks them (e.g. bert-base-uncased)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer is needed (offset mapping for keyword masks)")
    missing = [t for t in ("[ENC]", "[DEC]") if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


class CaptionTokenizer:
    """Batch-encode captions with keyword masks; picklable, so loader workers can run it."""

    def __init__(self, tokenizer, max_len: int):
        self.tok, self.max_len = tokenizer, max_len

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def token_id(self, token: str) -> int:
        return self.tok.convert_tokens_to_ids(token)

    def __call__(self, texts: Sequence[str], spans: Sequence[Sequence] | None = None) -> dict[str, torch.Tensor]:
        enc = self.tok(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                       return_offsets_mapping=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if spans is not None:
            out["keyword_mask"] = keyword_mask(enc["offset_mapping"], enc["attention_mask"], spans)
        return out


def keyword_mask(offsets: torch.Tensor, attention: torch.Tensor, spans: Sequence[Sequence]) -> torch.Tensor:
    """True for tokens whose characters fall inside a keyword span (special tokens have empty offsets)."""
    width = max((len(s) for s in spans), default=0)
    bounds = torch.full((len(spans), max(width, 1), 2), -1, dtype=torch.long)  # padding spans match nothing
    for i, sample_spans in enumerate(spans):
        if sample_spans:
            bounds[i, : len(sample_spans)] = torch.tensor([[int(sp[-2]), int(sp[-1])] for sp in sample_spans])
    start, end = offsets[..., 0, None], offsets[..., 1, None]  # (B, L, 1)
    inside = (start >= bounds[:, None, :, 0]) & (end <= bounds[:, None, :, 1]) & (end > start)  # (B, L, S)
    return inside.any(-1) & attention.bool()
