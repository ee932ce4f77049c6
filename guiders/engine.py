"""The GFCG step logic, shared by the ComfyUI guider and the headless sampler.

``GFCGEngine.denoise`` turns one sampler evaluation ``(x, sigma)`` into the guided denoised
estimate. It does not know how models are called: it asks ``evaluate_main`` / ``evaluate_guide``
for a list of :class:`Branch` requests (which conditioning, on which rows of the batch) and
``classify`` for logits of a denoised estimate. The caller batches each list into one forward.

Branches per evaluation (B = batch, R = confused rows, C = confident rows):

=================  ===============================  =======================
combine / mode     main model                       guide model
=================  ===============================  =======================
none               D1[B] + D_ref[R]                 --
cfg additive       D1[B] + D_neg[B] + D_ref[R]      --
cfg swap           D1[B] + D_neg[C] + D_ref[R]      --
atg additive       D1[B] + D_ref[R]                 G(c_des)[B]
atg swap           D1[B]                            G(c_des)[C] + G(c_ref)[R]
=================  ===============================  =======================

On a step where the classifier must look at the *current* D1, the main model runs twice: D1 (and,
additive, the negative) first, then the rows that depend on the decision (the reference rows;
swap: also the negative of the confident rows, so swap never evaluates more rows than CFG); with
``classify_input = "previous"`` it classifies the previous evaluation's guided estimate and every
evaluation is one forward per model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import core
from .config import GFCGConfig
from .schedule import GFCGSchedule

COMBINES = ("none", "cfg", "atg")
MODES = ("additive", "swap")
COMBINE_MODES = ("auto",) + MODES     # what the GFCG Combiner offers


def resolve_mode(combine: str, mode: str) -> str:
    """The stacking mode for ``combine``: auto = swap on autoguidance (ATG's cost; the reference
    class replaces the guide's label), additive on CFG (a confused sample keeps its negative
    prompt); additive / swap as given."""
    if mode == "auto":
        return "swap" if combine == "atg" else "additive"
    return mode


@dataclass
class Branch:
    """One requested prediction: ``cond`` in {"positive", "negative", "reference"} on ``rows``
    (None = the whole batch); for "reference", ``classes`` gives each row's class. A decision's
    branches also carry what the host knows of them (so that evaluating them reads nothing from the
    device): ``host_rows``, the same rows as a list, and for "reference" ``groups``, the rows by
    class (``Decision.reference_groups``: class, positions within ``rows`` on the device and on the host)."""

    cond: str
    rows: Optional[torch.Tensor] = None
    classes: Optional[torch.Tensor] = None
    host_rows: Optional[List[int]] = None
    groups: Optional[List[Tuple[int, torch.Tensor, List[int]]]] = None


Evaluate = Callable[[List[Branch]], List[torch.Tensor]]
CFGFunction = Callable[[torch.Tensor, Optional[torch.Tensor], object], torch.Tensor]


@dataclass
class StepResult:
    denoised: torch.Tensor        # the guided estimate
    cond: torch.Tensor            # D1
    uncond: torch.Tensor          # the branch D1 was pushed away from (per sample), for post-CFG hooks
    scale: float                  # the nominal scale (w, or 1 for GFCG alone)


@dataclass
class TraceEntry:
    step: int
    sigma: float
    p_des: List[float]
    omega: List[float]
    reference: List[int]          # -1 where the sample was confident


@dataclass
class GFCGEngine:
    config: GFCGConfig
    combine: str = "none"
    mode: str = "additive"
    scale: float = 1.0            # w: the CFG scale or the autoguidance weight
    skip_unit_negative: bool = True   # like ComfyUI: cfg == 1 skips the negative branch
    schedule: GFCGSchedule = field(init=False)
    trace: List[TraceEntry] = field(default_factory=list)
    # optional per-row desired classes [B] (the headless testbed samples several classes in one
    # batch); None: every row wants config.desired_class (the ComfyUI guider's case)
    desired_rows: Optional[torch.Tensor] = None
    _generator: Optional[torch.Generator] = field(default=None, init=False)
    _seed: int = field(default=0, init=False)
    _previous: Optional[torch.Tensor] = field(default=None, init=False)
    _streak: Optional[torch.Tensor] = field(default=None, init=False)   # [B] consecutive confident decisions
    _streak_host: Optional[List[int]] = field(default=None, init=False)  # the same, on the host
    _last_p: Optional[torch.Tensor] = field(default=None, init=False)   # [B] the p_des last seen per row

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"combine: {self.combine!r} is not one of {list(COMBINES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {list(MODES)}")
        c = self.config
        self.schedule = GFCGSchedule(c.window_start, c.window_end, c.period)

    # ---------------------------------------------------------------- run state
    def begin(self, sigmas, seed: Optional[int] = None, percent_to_sigma: Optional[Callable[[float], float]] = None,
              sampler_options: Optional[Mapping] = None) -> None:
        """Start a sampling run: reset decisions, trace and the stochastic generator.

        ``percent_to_sigma`` (the model's fraction -> sigma map) keys the window to the model's sigma
        range rather than to this slice of the schedule; ``sampler_options`` (the sampler's own
        options) tell a churning sampler's step starts. See ``GFCGSchedule.begin``."""
        self.schedule.begin(sigmas, percent_to_sigma, sampler_options)
        self.trace = []
        self._seed = int(seed) if seed is not None else 0
        self._generator = None
        self._previous = None
        self._streak = None
        self._streak_host = None
        self._last_p = None

    @property
    def n_steps(self) -> int:
        return self.schedule.n_steps

    def _rng(self, device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    def _in_play(self, batch: int) -> Optional[torch.Tensor]:
        """The rows still classified, ascending, on the device, or None for all of them: a row confident
        on ``settle_after`` consecutive classifier steps is settled (its decision, no guidance, stands
        and it is not classified again). Known on the host (the streaks are kept there too), so
        choosing the rows reads nothing from the device."""
        k = self.config.settle_after
        if k <= 0 or self._streak_host is None or len(self._streak_host) != batch:
            return None
        n_settled = sum(s >= k for s in self._streak_host)
        if not n_settled:
            return None
        return torch.argsort((self._streak >= k).to(torch.uint8), stable=True)[:batch - n_settled]

    def _classify_and_decide(self, step: int, sigma: float, x0: torch.Tensor,
                             classify: Callable[[torch.Tensor], torch.Tensor]) -> core.Decision:
        """Classify ``x0`` (only the rows still in play when settling is on) and decide."""
        b = x0.shape[0]
        rows = self._in_play(b)
        if rows is None:
            d = self._decide(step, sigma, classify(x0), b)
        else:
            d = self._decide(step, sigma, classify(x0[rows]) if rows.numel() else None, b, rows)
        if self.config.settle_after > 0:
            same = self._streak is not None and self._streak.shape[0] == b
            prev = self._streak if same else torch.zeros(b, dtype=torch.long, device=d.confused.device)
            prev_host = self._streak_host if same else [0] * b
            self._streak = torch.where(d.confused, torch.zeros_like(prev), prev + 1)
            self._streak_host = [0 if r >= 0 else s + 1 for s, r in zip(prev_host, d.host()[2])]
        return d

    def _decide(self, step: int, sigma: float, logits: Optional[torch.Tensor], batch: int,
                rows: Optional[torch.Tensor] = None) -> core.Decision:
        """The decision for the batch from ``logits`` of all rows, or of ``rows`` only (the others
        settled: confident, omega 1; ``logits`` None when no row is left)."""
        c = self.config
        n = batch if rows is None else int(rows.numel())
        if self.desired_rows is not None:  # checked on the host, before it goes to the device
            dr = self.desired_rows
            k = logits.shape[1] if logits is not None else None
            if dr.shape != (batch,) or (k is not None and not (0 <= int(dr.min()) and int(dr.max()) < k)):
                raise ValueError(f"desired_rows must hold {batch} class indices in 0..{(k or 0) - 1}")
        if logits is None:
            d = None
        else:
            probs = core.class_probabilities(logits, c.temperature)
            if self.desired_rows is not None:
                desired = self.desired_rows.to(probs.device, torch.long)
                desired = desired if rows is None else desired[rows.to(desired.device)]
            else:
                if not 0 <= c.desired_class < probs.shape[1]:
                    raise ValueError(f"desired_class index {c.desired_class} is outside the classifier's "
                                     f"0..{probs.shape[1] - 1}")
                desired = torch.full((n,), c.desired_class, dtype=torch.long, device=probs.device)
            gen = self._rng(probs.device) if c.reference_mode == "stochastic" else None
            d = core.decide(probs, desired, c.tau, c.alpha, c.beta, c.reference_mode, c.fixed_reference, gen)
        if rows is not None:   # settled rows: confident, their last p_des kept for the trace
            device = d.omega.device if d is not None else self._streak.device
            n = core.Decision.neutral(batch, device=device)
            full = core.Decision(n.omega, n.reference, n.confused, n.p_des)   # filled in below: not known on the host
            if self._last_p is not None:
                full.p_des = self._last_p.to(device).clone()
            if d is not None:
                r = rows.to(device)
                full.omega[r], full.reference[r], full.confused[r], full.p_des[r] = d.omega, d.reference, d.confused, d.p_des
            d = full
        self._last_p = d.p_des
        self.schedule.record(step, d)
        p_des, omega, reference = d.host()          # the decision's one host read
        self.trace.append(TraceEntry(step, sigma, p_des, omega, reference))
        return d

    # ---------------------------------------------------------------- one evaluation
    def denoise(self, x: torch.Tensor, sigma: float, evaluate_main: Evaluate,
                classify: Callable[[torch.Tensor], torch.Tensor],
                evaluate_guide: Optional[Evaluate] = None,
                pre_cfg: Optional[Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]] = None,
                cfg_fn: Optional[CFGFunction] = None) -> StepResult:
        """The guided denoised estimate for one sampler evaluation at noise level ``sigma``.

        ``cfg_fn(d1, d_neg or None, w)``, where given, computes the CFG part instead of
        ``core.cfg`` (the ComfyUI guider hands in ComfyUI's own CFG function, so that hooks such as
        RescaleCFG apply); ``None`` for ``d_neg`` means the negative was skipped (cfg = 1)."""
        if self.combine == "atg" and evaluate_guide is None:
            raise ValueError("autoguidance needs a guide model")
        b = x.shape[0]
        step = self.schedule.step_of(float(sigma))
        must = self.schedule.must_classify(step) and self.config.tau > 0  # tau = 0: nobody is ever confused
        if must and self.config.classify_input == "previous" and self._previous is not None:
            self._classify_and_decide(step, float(sigma), self._previous, classify)
            must = False

        decision = None if must else self.schedule.current(step)
        use_neg = self.combine == "cfg" and not (self.skip_unit_negative and self.scale == 1.0)

        # --- main model, first (and usually only) forward
        swap = self.mode == "swap"
        requests = [Branch("positive")]
        if use_neg and decision is not None:
            requests += self._negative_branches(decision, swap)
        elif use_neg and not (swap and must):
            requests.append(Branch("negative"))
        # (swap with the decision pending at this evaluation: the negative waits for it, so that
        # confused rows never evaluate a negative they will not use; NFE stays that of CFG. With no
        # decision in force -- outside the window, before its first classifier step, tau = 0 --
        # every row is confident and takes the negative now.)
        wants_ref = not (self.combine == "atg" and swap)
        if wants_ref and decision is not None and decision.any_confused:
            requests.append(self._reference_branch(decision))
        outs = evaluate_main(requests)
        d1 = outs[0]
        got = {r.cond: o for r, o in zip(requests, outs)}

        if must:  # paper order: D1 -> classify -> D_ref
            decision = self._classify_and_decide(step, float(sigma), d1, classify)
            late = self._negative_branches(decision, swap) if use_neg and swap else []
            if wants_ref and decision.any_confused:
                late.append(self._reference_branch(decision))
            if late:
                got.update((r.cond, o) for r, o in zip(late, evaluate_main(late)))
        if decision is None:
            decision = core.Decision.neutral(b, device=x.device)

        # --- guide model: one forward
        guide = None
        if self.combine == "atg":
            if self.mode == "swap" and decision.any_confused:
                conf, rest = decision.confused_rows, decision.confident_rows
                gre = [Branch("positive", rows=rest, host_rows=decision.confident_rows_host)] if rest.numel() else []
                gre.append(self._reference_branch(decision))
                gout = evaluate_guide(gre)
                guide = d1.new_empty(d1.shape)
                if rest.numel():
                    guide[rest] = gout[0]
                guide[conf] = gout[-1]
            else:
                guide = evaluate_guide([Branch("positive")])[0]

        result = self._combine(d1, got, guide, decision, pre_cfg, cfg_fn, use_neg)
        self._previous = result.denoised
        return result

    @staticmethod
    def _negative_branches(decision: core.Decision, swap: bool) -> List[Branch]:
        """The CFG negative: on every row, or in swap mode on the confident rows only (none when
        every row is confused: their reference takes the negative's place)."""
        if not (swap and decision.any_confused):
            return [Branch("negative")]
        rest = decision.confident_rows
        return [Branch("negative", rows=rest, host_rows=decision.confident_rows_host)] if rest.numel() else []

    @staticmethod
    def _reference_branch(decision: core.Decision) -> Branch:
        rows = decision.confused_rows
        return Branch("reference", rows=rows, classes=decision.reference[rows], host_rows=decision.confused_rows_host,
                      groups=decision.reference_groups())

    @staticmethod
    def _cfg(cfg_fn: Optional[CFGFunction], d1: torch.Tensor, d_neg: Optional[torch.Tensor], w) -> torch.Tensor:
        """The CFG part: ``cfg_fn`` where given, else ``core.cfg`` (D1 itself when the negative was skipped)."""
        if cfg_fn is not None:
            return cfg_fn(d1, d_neg, w)
        return d1 if d_neg is None else core.cfg(d1, d_neg, w)

    def _combine(self, d1, got, guide, decision: core.Decision, pre_cfg, cfg_fn=None, use_neg=True) -> StepResult:
        conf = decision.confused_rows          # ascending row indices: indexes as the mask would, without a sync
        anyc = decision.any_confused
        w = self.scale

        # GFCG alone, and GFCG + CFG at w = 1 with the negative skipped (CFG is then the identity,
        # as in ComfyUI: D = D1 + (omega - 1)(D1 - D_ref) on the confused rows, in either mode)
        if self.combine == "none" or (self.combine == "cfg" and not use_neg):
            uncond = d1
            if anyc:
                uncond = d1.clone()
                uncond[conf] = got["reference"]
            if pre_cfg is not None:
                d1, uncond = pre_cfg(d1, uncond)
            out = d1 if cfg_fn is None else self._cfg(cfg_fn, d1, None, 1.0)
            if anyc:
                base = out
                out = base.clone()
                out[conf] = core.combine_additive(base[conf], d1[conf], uncond[conf], decision.omega[conf])
            return StepResult(out, d1, uncond, 1.0)

        if self.combine == "cfg":
            neg = got.get("negative")
            if neg is None:                      # swap with every row confused
                base_uncond = d1
            elif neg.shape[0] == d1.shape[0]:
                base_uncond = neg
            else:                                # swap: the negative ran on the confident rows only
                base_uncond = d1.new_empty(d1.shape)
                base_uncond[decision.confident_rows] = neg
        else:
            base_uncond = guide                  # already holds G(c_ref) on confused rows in swap mode

        swap = self.mode == "swap" and anyc
        if swap and self.combine == "cfg":
            if base_uncond is d1 or base_uncond is got.get("negative"):
                base_uncond = base_uncond.clone()
            base_uncond[conf] = got["reference"]

        if pre_cfg is not None:
            d1, base_uncond = pre_cfg(d1, base_uncond)

        hooked = cfg_fn if self.combine == "cfg" else None   # ComfyUI's CFG hooks are for CFG, not autoguidance
        if swap:
            out = self._cfg(hooked, d1, base_uncond, core.swapped_scales(w, decision, self.config.swap_rule))
        else:
            out = self._cfg(hooked, d1, base_uncond, w) if base_uncond is not d1 else d1
            if anyc:                             # additive GFCG term on the confused rows
                out = out.clone()
                out[conf] = core.combine_additive(out[conf], d1[conf], got["reference"], decision.omega[conf])
        return StepResult(out, d1, base_uncond, w)
