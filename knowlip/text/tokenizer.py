"""Tokenizers, offline: a WordPiece tokenizer trained on the caption corpus, or any local HF fast tokenizer.

`CaptionTokenizer` turns captions (+ keyword character spans from the shard metadata) into token ids, an
attention mask and a keyword mask: the tokens the reconstruction loss always masks.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from knowlip.text.caption import GEO_FIELD

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "[DEC]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096) -> Path:
    """Build an uncased BERT-style WordPiece tokenizer from captions and save it as a HF fast tokenizer folder.

    The vocabulary is built deterministically (the `tokenizers` trainer numbers and breaks ties in hash-map
    order, so two runs on the same captions disagree): special tokens, every character alone and as a
    "##" continuation (so nothing is ever unknown), then whole words by frequency, ties alphabetical.
    Structured captions have a small vocabulary, so whole words cover nearly all of it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab_list = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in set(vocab_list)]
    vocab_list += words[: max(0, vocab_size - len(vocab_list))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    cls, sep = vocab_list.index("[CLS]"), vocab_list.index("[SEP]")
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


def run_tokenizer(configured: str | None, folder: Path, captions: Callable[[], Iterable[str]], vocab_size: int,
                  trains_here: bool, wait: Callable[[], None]):
    """The tokenizer of a training run: `configured` (model.tokenizer) when set; else the run's own WordPiece in
    `folder`, trained once on `captions()` by the process with `trains_here` while the others `wait`."""
    if configured:
        return load_tokenizer(configured)
    if trains_here and not (Path(folder) / "tokenizer.json").is_file():
        train_wordpiece(captions(), folder, vocab_size)
    wait()
    return load_tokenizer(folder)


class CaptionTokenizer:
    """Batch-encode captions with keyword masks; picklable, so loader workers can run it.

    Encodes with the Rust tokenizer directly (padding and truncation set on a private copy): the
    transformers call wrapper costs more than the tokenisation itself at loader rates.
    """

    def __init__(self, tokenizer, max_len: int, mask_geo_clause: bool = True):
        self.tok, self.max_len = tokenizer, max_len
        self.mask_geo_clause = mask_geo_clause  # model.losses.mask_geo_clause: the geo clause's span is a keyword
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
            if not self.mask_geo_clause:
                spans = [[s for s in sample if not (len(s) == 3 and s[0] == GEO_FIELD)] for sample in spans]
            out["keyword_mask"] = keyword_mask(_offsets(encodings), out["attention_mask"], spans)
        return out

    def span_masks(self, texts: Sequence[str], span_groups: Sequence[Sequence[Sequence]]) -> torch.Tensor:
        """(B, G, L): one keyword mask per group of spans (e.g. one group per clause), the texts encoded once."""
        encodings = self._fast.encode_batch(list(texts))
        attention = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        offsets = _offsets(encodings)
        return torch.stack([keyword_mask(offsets, attention, spans) for spans in span_groups], dim=1)


def _offsets(encodings) -> torch.Tensor:
    return torch.tensor([e.offsets for e in encodings], dtype=torch.long)


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
