"""Which tokens made the call: each token's attribution to a class's log-odds.

The explained quantity is the class's log-odds, ``z_k - logsumexp(z_j, j != k)`` (for two classes the
logit difference), of the calibrated logits. Two methods:

- ``ig``, integrated gradients (Sundararajan et al. 2017) through Captum: the token embeddings move in a
  straight line from a baseline (every token replaced by the pad token, ``<|endoftext|>`` for GPT-2, at the
  same positions) to the text's; a token's attribution is its embedding difference times the path integral
  of the gradient. Completeness: they sum to f(text) - f(baseline), up to the quadrature error Captum reports
  as ``delta``. Needs the optional extra ``lorafit[explain]`` (captum).
- ``occlusion``: a token's attribution is f(text) - f(text with that token replaced by the pad token),
  exact, one forward pass per token, all in one batch: cheap for short texts, no extra package.

``auto`` picks per text whichever costs less: occlusion runs T + 1 forward passes, integrated gradients
``steps`` forward and backward passes (about three forwards each). On real models the straight path from
the pad-token baseline is rugged (SmolLM2 on an SMS message: the log-odds jump by 1.4 between neighbouring
points of 200), so 32 steps can miss completeness by 90 %: the steps are doubled (up to 4x) until the
attributions add up within 5 %, and an explanation that still does not is labelled unreliable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import LorafitError, SettingError
from ..runtime import Compute
from ..data.batching import Input, encode_texts, shown
from ..data.windows import Windows
from ..reporting.calibration import decide, thresholds_for
from .predict import load_for_inference, predict_proba

METHODS = ("auto", "ig", "occlusion")
IG_STEPS = 32
IG_REFINE = 4  # integrated gradients may take up to this many times the steps asked for, to converge
COMPLETENESS = 0.05  # the largest |delta| / |f(text) - f(baseline)| taken as converged
CHUNK = 32  # sequences per forward pass (integrated-gradient steps, occluded copies)


@dataclass
class Explanation:
    """One text's tokens and their attributions to ``label``'s log-odds (positive: towards it)."""

    text: str
    label: str  # the class explained (by default the decided one)
    tokens: list[str]
    attributions: list[float]
    method: str  # how, in words: "integrated gradients (Captum, 32 steps, pad-token baseline)" or "occlusion ..."
    log_odds: float  # f(text)
    baseline_log_odds: float | None = None  # f(baseline), integrated gradients only
    delta: float | None = None  # sum(attributions) - (f(text) - f(baseline)): the quadrature error
    gap: float | None = None  # |delta| relative to |f(text) - f(baseline)|; above COMPLETENESS: not converged
    extra: dict = field(default_factory=dict)

    def top(self, k: int = 3) -> list[dict]:
        """The ``k`` tokens pushing most towards ``label``."""
        order = np.argsort(-np.asarray(self.attributions), kind="stable")[:k]
        return [{"token": self.tokens[i], "attribution": self.attributions[i]} for i in order]

    def terminal(self, color: bool = True) -> str:
        """The text with each token's background green (towards ``label``) or red (away), deeper for larger
        attributions; without ``color``, the top tokens in words only."""
        top = ", ".join(f"{t['token']!r} {t['attribution']:+.3f}" for t in self.top(5))
        if not color:
            return f"  top tokens towards {self.label}: {top}"
        scale = max((abs(a) for a in self.attributions), default=0.0) or 1.0
        parts = []
        for token, a in zip(self.tokens, self.attributions):
            level = min(abs(a) / scale, 1.0)
            fade = int(255 - level * 175)  # white -> a strong green or red
            rgb = (fade, 255, fade) if a > 0 else (255, fade, fade)
            parts.append(f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;0;0;0m{token}\x1b[0m")
        return "  " + "".join(parts) + f"\n  top tokens towards {self.label}: {top}"

    def to_dict(self) -> dict:
        out = {"text": self.text, "label": self.label, "method": self.method, "log_odds": self.log_odds,
               "tokens": [{"token": t, "attribution": a} for t, a in zip(self.tokens, self.attributions)]}
        if self.baseline_log_odds is not None:
            out.update(baseline_log_odds=self.baseline_log_odds, delta=self.delta, completeness_gap=self.gap)
        return {**out, **self.extra}


def log_odds(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(S, C) logits -> (S,) log-odds of class ``k`` against all the others."""
    others = torch.cat([logits[:, :k], logits[:, k + 1:]], dim=1)
    return logits[:, k] - torch.logsumexp(others, dim=1)


def token_embedding(backbone: nn.Module) -> nn.Embedding:
    """The token-embedding table of any lorafit backbone (GPT-2, Llama, a transformers model)."""
    inner = getattr(backbone, "model", backbone)
    if hasattr(inner, "get_input_embeddings"):
        return inner.get_input_embeddings()
    for name in ("tok_emb", "embed_tokens"):
        if isinstance(getattr(inner, name, None), nn.Embedding):
            return getattr(inner, name)
    raise LorafitError(f"cannot find the token embeddings of {type(inner).__name__} to explain it")


def resolve_method(method: str) -> str:
    """Check ``method``; ``auto`` stays ``auto`` (chosen per text by :func:`method_for`) when Captum is
    installed, else becomes occlusion."""
    if method not in METHODS:
        raise LorafitError(f"explanation method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "occlusion":
        return method
    try:
        import captum.attr  # noqa: F401
    except ImportError as e:
        if method == "ig":
            raise LorafitError("integrated gradients need Captum: pip install 'lorafit[explain]' "
                               "(or explain by occlusion)") from e
        return "occlusion"
    return method


def method_for(method: str, n_tokens: int, steps: int) -> str:
    """The method for one text of ``n_tokens``: ``auto`` takes the cheaper, occlusion while its T + 1
    forward passes cost no more than integrated gradients' ``steps`` forward-and-backward passes."""
    if method != "auto":
        return method
    return "occlusion" if n_tokens + 1 <= 3 * steps else "ig"


def completeness_gap(delta: float, fx: float, fb: float) -> float:
    """|delta| relative to |f(text) - f(baseline)|: how far integrated gradients' attributions miss completeness."""
    return abs(delta) / max(abs(fx - fb), 1e-6)


def integrated_gradients(forward: Callable[[torch.Tensor], torch.Tensor], embedding: nn.Embedding, ids: torch.Tensor,
                         pad_id: int, k: int, steps: int = IG_STEPS,
                         refine: int = 1) -> tuple[np.ndarray, float, float, float, int]:
    """(attributions (T,), f(text), f(baseline), delta, steps taken) for one (1, T) text; ``forward``: ids (S, T)
    -> logits (S, C). The steps double, up to ``refine`` times ``steps``, until the completeness gap is within
    COMPLETENESS; f(text) and f(baseline) are computed once, and delta from them (what Captum would recompute)."""
    from captum.attr import IntegratedGradients

    with torch.no_grad():
        x = embedding(ids).detach().float()  # (1, T, D)
        base = embedding(torch.full_like(ids, pad_id)).detach().float()  # (1, T, D)

    def f(emb: torch.Tensor) -> torch.Tensor:  # (S, T, D) -> (S,): the text's ids with these embeddings
        hook = embedding.register_forward_hook(lambda m, i, out: emb.reshape(out.shape).to(out.dtype))
        try:
            return log_odds(forward(ids.expand(emb.shape[0], -1)).float(), k)
        finally:
            hook.remove()

    with torch.no_grad():
        fx, fb = float(f(x)[0]), float(f(base)[0])
    n = steps
    while True:
        with torch.enable_grad():
            attr = IntegratedGradients(f).attribute(x, baselines=base, n_steps=n, internal_batch_size=CHUNK)
        attr = attr.sum(dim=-1)[0].detach().numpy().astype(np.float64)  # (T,)
        delta = float(attr.sum()) - (fx - fb)
        if completeness_gap(delta, fx, fb) <= COMPLETENESS or n * 2 > steps * refine:
            return attr, fx, fb, delta, n
        n *= 2


@torch.no_grad()
def occlusion(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, pad_id: int,
              k: int) -> tuple[np.ndarray, float]:
    """(attributions (T,), f(text)): f(text) - f(text with token t replaced by the pad token), for every t."""
    t = ids.shape[1]
    copies = ids.repeat(t + 1, 1)  # row 0: the text; row 1 + t: token t occluded
    copies[torch.arange(1, t + 1), torch.arange(t)] = pad_id
    scores = torch.cat([log_odds(forward(copies[s:s + CHUNK]).float(), k) for s in range(0, t + 1, CHUNK)])
    return (scores[0] - scores[1:]).numpy().astype(np.float64), float(scores[0])


def explain_ids(forward: Callable[[torch.Tensor], torch.Tensor], embedding: nn.Embedding, encoder, text: str,
                ids: list[int], labels: list[str], k: int, method: str, steps: int = IG_STEPS,
                refine: int = IG_REFINE) -> Explanation:
    """One text's :class:`Explanation` for class ``k``; ``method`` as :func:`resolve_method` left it;
    integrated gradients may take up to ``refine`` times ``steps`` to converge."""
    device = embedding.weight.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    tokens = [encoder.decode([i]) for i in ids]
    if method_for(method, len(ids), steps) == "ig":
        attr, fx, fb, delta, n = integrated_gradients(forward, embedding, x, encoder.pad_id, k, steps, refine)
        gap = completeness_gap(delta, fx, fb)
        how = (f"integrated gradients (Captum, {n} steps, baseline: every token the pad token; completeness gap "
               f"{gap:.1%}" + (")" if gap <= COMPLETENESS else ": not converged, unreliable; try occlusion)"))
        return Explanation(text, labels[k], tokens, attr.tolist(), how, fx, fb, delta, gap)
    attr, fx = occlusion(forward, x, encoder.pad_id, k)
    return Explanation(text, labels[k], tokens, attr.tolist(), "occlusion (exact: each token replaced by the pad token)", fx)


def classifier_forward(model, compute: Compute) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids (S, T) of equal length -> logits (S, C), in the run's precision."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with compute.autocast():
            return model(ids, torch.ones_like(ids))

    return forward


def check_explainable(multi_label: bool, labels: list[str], target: str | None, windows: Windows | None,
                      ids: list[list[int]], name: str) -> None:
    """What an explanation refuses, for :func:`explain_texts` and POST /explain alike: a multi-label classifier
    (no one softmax's log-odds to explain), a ``target`` that is not a label, a text over one window."""
    if multi_label:
        raise LorafitError(f"explanations are for single-label classifiers (softmax log-odds); {name} is multi-label")
    if target is not None and target not in labels:
        raise SettingError("{target} {!r}: not one of the labels {}", target, ", ".join(labels))
    if windows is not None:
        windows.check_explainable(ids)


def explain_decided(forward: Callable[[torch.Tensor], torch.Tensor], embedding: nn.Embedding, encoder,
                    texts: list[Input], ids: list[list[int]], probs: np.ndarray, labels: list[str],
                    thresholds: dict[str, float], target: str | None, method: str,
                    steps: int = IG_STEPS) -> list[Explanation]:
    """Each text's :class:`Explanation` towards ``target`` (none: the class decided from its ``probs`` (N, C) at
    ``thresholds``, as predict decides), with that prediction in ``extra``; checked by :func:`check_explainable`."""
    out = []
    for text, x, p, d in zip(texts, ids, probs, decide(probs, labels, thresholds)):
        k = labels.index(target) if target is not None else int(d)
        e = explain_ids(forward, embedding, encoder, shown(text), x, labels, k, method, steps)
        e.extra = {"predicted": labels[d], "probability": float(p[d]),
                   "probabilities": dict(zip(labels, map(float, p)))}
        out.append(e)
    return out


def explain_texts(run: str | Path, texts: list[str], *, target: str | None = None, method: str = "auto",
                  steps: int = IG_STEPS, device: str = "auto", precision: str = "auto",
                  threshold: float | dict | None = None) -> list[Explanation]:
    """Each text's prediction (as :func:`predict_texts` gives it, in ``extra``) and its tokens' attributions
    to ``target`` (none: the class predict decides). Every text is tokenised once, for both."""
    method = resolve_method(method)
    loaded = load_for_inference(run, device, precision)
    labels, encoder = loaded.labels, loaded.backbone.encoder
    enc = encode_texts(encoder, texts, None, loaded.backbone.context_length, where="input", pair=loaded.spec.pair,
                       long=loaded.spec.long)
    check_explainable(loaded.spec.multi_label, labels, target, enc.windows, enc.ids, str(run))
    probs = predict_proba(loaded.model, enc, encoder.pad_id, compute=loaded.compute)
    forward, embedding = classifier_forward(loaded.model, loaded.compute), token_embedding(loaded.model.backbone)
    return explain_decided(forward, embedding, encoder, texts, enc.ids, probs, labels,
                           thresholds_for(loaded.spec.thresholds, labels, threshold), target, method, steps)
