"""Tokenizers, offline: a WordPiece tokenizer trained on the caption corpus, or any local HF fast tokenizer.

`CaptionTokenizer` turns captions (+ keyword character spans from the shard metadata) into token ids, an
attention mask and a keyword mask: the tokens the reconstruction loss always masks.
"""

from __future__ import annotations

import copy
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
    """Batch-encode captions with keyword masks; picklable, so loader workers can run it.

    Encodes with the Rust tokenizer directly (padding and truncation set on a private copy): the
    transformers call wrapper costs more than the tokenisation itself at loader rates.
    """

    def __init__(self, tokenizer, max_len: int):
        self.tok, self.max_len = tokenizer, max_len
        self._fast = copy.deepcopy(tokenizer.backend_tokenizer)
        self._fast.enable_truncation(max_len)
        self._fast.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def token_id(self, token: str) -> int:
        return self.tok.convert_tokens_to_ids(token)

    def __call__(self, texts: Sequence[str], spans: Sequence[Sequence] | None = None) -> dict[str, torch.Tensor]:
        encodings = self._fast.encode_batch(list(texts))
        out = {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
               "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)}
        if spans is not None:
            offsets = torch.tensor([e.offsets for e in encodings], dtype=torch.long)
            out["keyword_mask"] = keyword_mask(offsets, out["attention_mask"], spans)
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
