"""GFCG core: the per-sample decision and the guidance combinations, in plain PyTorch.

Nothing here imports ComfyUI. Notation (see ``../shared/reference/gfcg-spec.md`` and the README):

* ``D1 = D(x; sigma, c_des)`` -- the model's denoised estimate for the desired class.
* ``p = softmax(logits(x0_hat) / T)`` over the classifier's ``K`` classes, ``p_des = p[c_des]``.
* A sample is *confused* when ``p_des < tau``; only confused samples get a reference branch.

Each formula lives in exactly one function below, with its equation in the docstring. Which parts
are the paper's and which are this project's reading is stated in the README ("The formulas").
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

REFERENCE_MODES = ("deterministic", "stochastic", "fixed")


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------

def class_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p = softmax(logits / T), over the last dimension, computed in float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def confused_mask(p_des: torch.Tensor, tau: float) -> torch.Tensor:
    """A sample is confused iff p_des < tau (so tau = 0 never guides, tau = 1 guides unless p_des = 1)."""
    return p_des < tau


def gfcg_scale(p_des: torch.Tensor, tau: float, alpha: float, beta: float) -> torch.Tensor:
    """omega = 1 + alpha * (1 - p_des / tau) ** beta   for p_des < tau, else 1.

    0 extra guidance at the threshold, growing to alpha as p_des -> 0 (beta shapes the ramp).
    """
    conf = confused_mask(p_des, tau)
    ratio = (1.0 - p_des.float() / tau).clamp(min=0.0)
    return torch.where(conf, 1.0 + alpha * ratio.pow(beta), torch.ones_like(ratio))   # no host read


def deterministic_reference(probs: torch.Tensor, desired: torch.Tensor) -> torch.Tensor:
    """c_ref = argmax_{k != c_des} p_k  (per sample)."""
    masked = probs.clone()
    masked.scatter_(1, desired.view(-1, 1), float("-inf"))
    return masked.argmax(dim=1)


def stochastic_reference(probs: torch.Tensor, desired: torch.Tensor,
                         generator: Optional[torch.Generator]) -> torch.Tensor:
    """c_ref ~ p_k / (1 - p_des) over k != c_des, drawn with ``generator`` (seeded from the sampling seed)."""
    weights = probs.float().clone()
    weights.scatter_(1, desired.view(-1, 1), 0.0)
    total = weights.sum(dim=1, keepdim=True)
    # A row whose other classes all underflowed to 0 falls back to a uniform draw over k != c_des.
    empty = total.squeeze(1) <= 0
    if empty.any():
        weights[empty] = 1.0
        weights[empty] = weights[empty].scatter(1, desired[empty].view(-1, 1), 0.0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@dataclass
class Decision:
    """One classifier decision for a batch: per-sample scale, reference class and the p_des seen.

    Everything the host needs of a decision (which rows are confused, their reference classes, the
    values the trace shows) comes from ONE read of the device (:meth:`host`), made at its first use
    and kept: a decision is not changed once it is used."""

    omega: torch.Tensor       # [B] float32, 1 for confident samples
    reference: torch.Tensor   # [B] long, meaningful where ``confused``
    confused: torch.Tensor    # [B] bool
    p_des: torch.Tensor       # [B] float32

    @classmethod
    def neutral(cls, batch: int, device=None) -> "Decision":
        """No guidance for anybody (outside the window, or before the first decision); known on the
        host without a read."""
        d = cls(omega=torch.ones(batch, device=device), reference=torch.zeros(batch, dtype=torch.long, device=device),
                confused=torch.zeros(batch, dtype=torch.bool, device=device), p_des=torch.ones(batch, device=device))
        d.__dict__["_host"] = ([1.0] * batch, [1.0] * batch, [-1] * batch)
        d.__dict__["_rows_host"] = ([], list(range(batch)))
        d.__dict__["_split"] = (torch.zeros(0, dtype=torch.long, device=device), torch.arange(batch, device=device))
        return d

    def host(self) -> Tuple[List[float], List[float], List[int]]:
        """(p_des, omega, reference or -1 where confident) as Python lists: the decision's one host read."""
        cached = self.__dict__.get("_host")
        if cached is None:
            ref = torch.where(self.confused, self.reference, torch.full_like(self.reference, -1))
            p, w, r = torch.stack((self.p_des.float(), self.omega.float(), ref.float())).tolist()
            cached = self.__dict__["_host"] = (p, w, [int(v) for v in r])
        return cached

    def _rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(confused rows, confident rows), ascending, on ``confused``'s device: a stable sort puts the
        confused rows first and the host knows how many (:meth:`host`), so no further read."""
        cached = self.__dict__.get("_split")
        if cached is None:
            order = torch.argsort((~self.confused).to(torch.uint8), stable=True)
            n = len(self.confused_rows_host)
            cached = self.__dict__["_split"] = (order[:n], order[n:])
        return cached

    @property
    def any_confused(self) -> bool:
        return bool(self.confused_rows_host)

    @property
    def confused_rows(self) -> torch.Tensor:
        return self._rows()[0]

    @property
    def confident_rows(self) -> torch.Tensor:
        return self._rows()[1]

    def _host_rows(self) -> Tuple[List[int], List[int]]:
        cached = self.__dict__.get("_rows_host")
        if cached is None:
            ref = self.host()[2]
            cached = self.__dict__["_rows_host"] = ([i for i, r in enumerate(ref) if r >= 0],
                                                    [i for i, r in enumerate(ref) if r < 0])
        return cached

    @property
    def confused_rows_host(self) -> List[int]:
        """The confused rows, ascending, as a Python list (what :attr:`confused_rows` holds)."""
        return self._host_rows()[0]

    @property
    def confident_rows_host(self) -> List[int]:
        return self._host_rows()[1]

    def reference_groups(self) -> List[Tuple[int, torch.Tensor, List[int]]]:
        """The confused rows grouped by reference class, classes ascending: (class, positions within
        :attr:`confused_rows` on the device, the same positions on the host). Made once, without a
        further read (a stable sort on the device, the group sizes from :meth:`host`)."""
        cached = self.__dict__.get("_groups")
        if cached is None:
            ref = self.host()[2]
            classes = [ref[i] for i in self.confused_rows_host]
            by_class = sorted(range(len(classes)), key=classes.__getitem__)   # stable, as the device's sort
            host = [(k, list(g)) for k, g in itertools.groupby(by_class, key=classes.__getitem__)]
            order = torch.argsort(self.reference[self.confused_rows], stable=True)
            device = order.split([len(g) for _, g in host]) if host else ()
            cached = self.__dict__["_groups"] = [(k, sel, g) for (k, g), sel in zip(host, device)]
        return cached


def decide(probs: torch.Tensor, desired: torch.Tensor, tau: float, alpha: float, beta: float,
           mode: str = "deterministic", fixed_reference: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> Decision:
    """The per-sample GFCG decision from class probabilities ``probs`` [B, K].

    confident (p_des >= tau): omega = 1, no reference branch;
    confused  (p_des <  tau): omega = ``gfcg_scale``, c_ref from ``mode``:
    deterministic (``deterministic_reference``), stochastic (``stochastic_reference``) or fixed
    (the user's class; the tau test and omega still apply).
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
    desired = desired.to(device=probs.device, dtype=torch.long)
    p_des = probs.gather(1, desired.view(-1, 1)).squeeze(1).float()
    confused = confused_mask(p_des, tau)
    omega = gfcg_scale(p_des, tau, alpha, beta)
    reference = torch.zeros_like(desired)
    if mode == "fixed":
        if fixed_reference is None:
            raise ValueError("reference mode 'fixed' needs a fixed reference class")
        reference = torch.where(confused, torch.full_like(desired, int(fixed_reference)), reference)
    elif mode == "deterministic":   # per row, so computed on every row and kept where confused: no host read
        reference = torch.where(confused, deterministic_reference(probs, desired), reference)
    elif confused.any():            # stochastic: the draws are made for the confused rows only (one read)
        reference[confused] = stochastic_reference(probs[confused], desired[confused], generator)
    return Decision(omega=omega, reference=reference, confused=confused, p_des=p_des)


def reference_candidates(mode: str, num_classes: int, desired: Sequence[int],
                         fixed_reference: Optional[int] = None) -> List[int]:
    """Every class ``decide`` can pick as a reference: the fixed class in mode 'fixed', else every
    class that is not desired (the runner-up and the stochastic draw exclude the desired class)."""
    if mode == "fixed":
        return [int(fixed_reference)]
    skip = {int(d) for d in desired}
    return [k for k in range(int(num_classes)) if k not in skip]


# --------------------------------------------------------------------------------------------
# The combinations (in denoised space; omega, w are per sample, broadcast over C, H, W)
# --------------------------------------------------------------------------------------------

def _per_sample(v, like: torch.Tensor):
    """A per-sample scale shaped to broadcast over ``like`` ([B] -> [B, 1, ...]); a plain number
    stays a Python float (no host-to-device copy in the step loop)."""
    if not torch.is_tensor(v):
        return float(v)
    return v.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def guidance_term(d1: torch.Tensor, d_other: torch.Tensor, scale) -> torch.Tensor:
    """(s - 1) * (D1 - D_other): the push of D1 away from D_other with strength s (s = 1: none)."""
    return (_per_sample(scale, d1) - 1.0) * (d1 - d_other)


def combine_gfcg(d1: torch.Tensor, d_ref: torch.Tensor, omega) -> torch.Tensor:
    """GFCG alone:  D = D1 + (omega - 1) * (D1 - D_ref)."""
    return d1 + guidance_term(d1, d_ref, omega)


def cfg(d1: torch.Tensor, d_neg: torch.Tensor, w) -> torch.Tensor:
    """CFG, written as ComfyUI writes it:  D = D_neg + (D1 - D_neg) * w  ( = D1 + (w - 1)(D1 - D_neg) )."""
    return d_neg + (d1 - d_neg) * _per_sample(w, d1)


def combine_additive(base: torch.Tensor, d1: torch.Tensor, d_ref: torch.Tensor, omega) -> torch.Tensor:
    """Additive stacking on a base guidance result (CFG or autoguidance):

    D = base + (omega - 1) * (D1 - D_ref), with base = D1 + (w - 1)(D1 - D_neg)  (GFCG + CFG)
    or base = D1 + (w - 1)(D1 - G(c_des))  (GFCG + ATG).
    """
    return base + guidance_term(d1, d_ref, omega)


SWAP_RULES = ("sum", "max", "omega", "base")


def swap_scale(w: float, omega: torch.Tensor, rule: str = "sum") -> torch.Tensor:
    """Scale w' of a swapped branch: a confused sample's negative (CFG) or guide (ATG) branch is
    replaced by its reference branch, D = D_ref + w' (D1 - D_ref). The rules:

    sum:    w' = w + (omega - 1)   the base strength plus GFCG's (w' = w at the threshold, omega = 1,
                                   so the total strength is continuous in p_des)
    max:    w' = max(w, omega)     never weaker than the base guidance, GFCG's strength where larger
    omega:  w' = omega             the paper's formula taken literally: D = omega D1 - (omega - 1) D_ref
    base:   w' = w                 only the direction changes, not the strength
    """
    if rule == "sum":
        return w + (omega - 1.0)
    if rule == "max":
        return torch.clamp(omega, min=float(w)) if torch.is_tensor(omega) else max(float(w), omega)
    if rule == "omega":
        return omega
    if rule == "base":
        return torch.full_like(omega, float(w)) if torch.is_tensor(omega) else float(w)
    raise ValueError(f"swap rule must be one of {list(SWAP_RULES)}, got {rule!r}")


def swapped_scales(w: float, decision: Decision, rule: str = "sum") -> torch.Tensor:
    """Per-sample scale for a swap mode: w for confident samples, ``swap_scale`` for confused ones."""
    return torch.where(decision.confused, swap_scale(w, decision.omega, rule), torch.full_like(decision.omega, float(w)))
