"""Texts longer than the model's window: truncated (the default), or cut into overlapping windows whose
logits are pooled back into one row per text (``long="chunk"``, the way setfit issue 398 asks for and
BELT, mim-solutions/bert_for_longer_texts, does it).

Training on chunked texts puts the loss on the pooled logits of each text, not on each window with the
text's label. A window-level loss would teach every window of a spam message to read as spam, the ones
holding nothing but greetings too: when the deciding words sit in one window only (the reason to chunk),
most windows carry a label they do not show. Pooled first, the loss asks only that the text's pooled
answer be right; with ``max`` its gradient reaches the window that decides each class, with ``mean``
every window equally. Training and inference then compute the same function, so the validation
metrics, the calibration temperature and the thresholds fitted on them hold for what predict answers.
The price: all windows of a text run in the same batch (a batch of ``batch_size`` texts may hold many
more rows).

Mean is the default: trained from scratch on pooled logits, max sends each class's gradient to one window
only, and where many windows look alike (a shared preamble) that window is the same for texts of every
class and their gradients cancel. Measured on the tests' task (the class word after a 50-token opening,
16-token windows): mean learned it, max stayed at chance after 4 epochs. Max suits an adapter that already
separates windows, or texts whose windows differ.

Temperature scaling commutes with both poolings (``max(x / T) = max(x) / T``, the same for the mean), so
a calibrated head pools exactly as the uncalibrated one followed by the temperature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import FieldError, SettingError

LONG_MODES = ("truncate", "chunk")
POOLS = ("mean", "max")


@dataclass(frozen=True)
class LongTexts:
    """What happens to a text longer than the window; saved in the adapter, so that eval, predict and serve
    read texts as training did."""

    long: str = "truncate"  # truncate: keep the first window's tokens; chunk: overlapping windows, pooled
    stride: int | None = None  # tokens from one window's start to the next's (chunk); None: half the window
    pool: str = "mean"  # how the windows' logits become the text's: their mean or their max (chunk)
    max_length: int | None = None  # tokens in a window (and where truncation cuts); None: the model's context

    def __post_init__(self) -> None:
        problems = []
        if self.long not in LONG_MODES:
            problems.append(SettingError("{long} must be one of {}, got {!r}", ", ".join(LONG_MODES), self.long))
        if self.pool not in POOLS:
            problems.append(SettingError("{pool} must be one of {}, got {!r}", ", ".join(POOLS), self.pool))
        if self.stride is not None and self.stride <= 0:
            problems.append(SettingError("{stride} must be > 0, got {}", self.stride))
        if self.max_length is not None and self.max_length < 2:
            problems.append(SettingError("{max_length} must be >= 2, got {}", self.max_length))
        if self.long != "chunk" and self.stride is not None:
            problems.append(SettingError("{stride} applies to {long} chunk"))
        if problems:
            raise SettingError.joined(problems)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A sentence for an export's README: what lorafit does with a long text, that the export's user must
        do the same to get lorafit's answers (transformers' pipelines truncate)."""
        if self.long != "chunk":
            return ""
        window = f"{self.max_length} tokens" if self.max_length else "the context"
        stride = f"every {self.stride} tokens" if self.stride else "every half window"
        return (f" lorafit reads a text longer than {window} as overlapping windows of that length starting {stride}, "
                f"the last one ending at the text's end, and takes the {self.pool} of the windows' logits; "
                "transformers truncates instead, so run each window and pool their logits to get lorafit's answers.")

    def length(self, context_length: int) -> int:
        """Tokens in a window: ``max_length``, which may not exceed the model's ``context_length``."""
        if self.max_length is not None and self.max_length > context_length:
            raise SettingError("{max_length} {} is more than the model's context ({} tokens)", self.max_length,
                               context_length)
        return self.max_length or context_length

    def windows(self, context_length: int, frame: tuple[int, int] = (0, 0)) -> "Windows | None":
        """How texts are cut for a model of ``context_length`` (None: truncated, not chunked); ``frame``: the
        special tokens the tokenizer puts before and after every text, repeated in every window."""
        if self.long != "chunk":
            return None
        size = self.length(context_length)
        room = size - sum(frame)  # the text's own tokens in a window
        stride = self.stride if self.stride is not None else max(1, room // 2)
        if stride >= room:
            raise SettingError("{stride} {} must be smaller than the window ({} tokens of text: {max_length} or the "
                               "model's context{}) so that windows overlap", stride, room,
                               f", less {sum(frame)} special tokens" if sum(frame) else "")
        return Windows(size, stride, self.pool, frame)


def frame_of(encoder) -> tuple[int, int]:
    """How many special tokens an encoder adds before and after each text (a [CLS] ... [SEP] pair: (1, 1)), as
    its ``single_template`` says (lorafit's own tokenizers add none)."""
    prefix, suffix = getattr(encoder, "single_template", ([], []))
    return len(prefix), len(suffix)


@dataclass(frozen=True)
class Windows:
    """Overlapping windows of ``size`` tokens every ``stride`` tokens; the last one ends at the text's end, so
    every window of a long text is full. A text that fits is one window, itself."""

    size: int
    stride: int
    pool: str = "mean"
    frame: tuple[int, int] = (0, 0)  # special tokens at the start and end of an encoded text, kept in each window

    def cut(self, ids: list[int]) -> list[list[int]]:
        """One encoded text -> its windows."""
        if len(ids) <= self.size:
            return [ids]
        lead, trail = self.frame
        head, body, tail = ids[:lead], ids[lead:len(ids) - trail], ids[len(ids) - trail:]
        room = self.size - lead - trail
        starts = list(range(0, len(body) - room, self.stride)) + [len(body) - room]
        return [head + body[s:s + room] + tail for s in starts]

    def count(self, n_tokens: int) -> int:
        """How many windows a text of ``n_tokens`` tokens becomes."""
        return 1 if n_tokens <= self.size else -(-(n_tokens - self.size) // self.stride) + 1

    def fits(self, ids: list[int]) -> bool:
        """One window holds the whole text: its answer is one sequence's, which token attributions explain."""
        return len(ids) <= self.size

    def check_explainable(self, texts: list[list[int]]) -> None:
        """Refuse a text over one window: its answer pools several windows, which one sequence's token
        attributions do not describe. The error names the setting by field (``long``), so that the HTTP API
        says the field and the CLI its flag."""
        i = next((k for k, ids in enumerate(texts) if not self.fits(ids)), None)
        if i is not None:
            raise FieldError("input {} has {} tokens, more than the run's {}-token window ({long} chunk): its answer "
                             "pools several windows, which token attributions do not explain; explain a text that "
                             "fits one window", i, len(texts[i]), self.size)

    def split(self, texts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
        """Encoded texts -> every window in text order, and the text each window came from (R,)."""
        rows, owner = [], []
        for i, ids in enumerate(texts):
            parts = self.cut(ids)
            rows += parts
            owner += [i] * len(parts)
        return rows, torch.tensor(owner, dtype=torch.long)


def pool_windows(logits: torch.Tensor, owner: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """Window logits (R, C) -> text logits (n, C): each text's windows' elementwise max or mean.
    Differentiable (the max's gradient goes to the window that reached it)."""
    index = owner.to(logits.device)[:, None].expand_as(logits)  # (R, C)
    if how == "max":
        start = logits.new_full((n, logits.shape[1]), float("-inf"))
        return start.scatter_reduce(0, index, logits, "amax", include_self=True)  # (n, C)
    if how == "mean":
        return logits.new_zeros((n, logits.shape[1])).scatter_reduce(0, index, logits, "mean", include_self=False)
    raise SettingError("{pool} must be one of {}, got {!r}", ", ".join(POOLS), how)
