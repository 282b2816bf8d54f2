"""Controllers for kl_coef (beta), the weight of the per-token KL penalty in token_rewards.token_level_rewards.

fixed:    beta never changes.
adaptive: Ziegler et al. 2019, sec. 2.2: e = clip(KL / KL_target - 1, -0.2, 0.2), beta *= 1 + K_beta * e.
          As in lm-human-preferences and trl, K_beta is n_steps / horizon (n_steps: samples in this batch), so
          the speed of adaptation does not depend on the batch size: over S samples beta moves by at most
          about a factor exp(+-0.2 * S / horizon).
Trap: current_kl must be in the same unit as target: the KL of a whole response (the sum over its tokens,
averaged over the batch; Ziegler's target is 6 nats for sentiment), not the per-token mean.
These are classes because they hold state. The state is a small JSON-serialisable dict so that the coefficient
survives across iterations run in separate processes: `KL_CONTROLLERS[state["kind"]].from_state(state)`.
"""

from rlhf_core.registry import lookup, register

KL_CONTROLLERS: dict[str, type] = {}


@register(KL_CONTROLLERS, "fixed")
class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, init_coef: float):
        self.value = float(init_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    @classmethod
    def from_state(cls, state: dict) -> "FixedKLController":
        _check_kind(state, "fixed")
        return cls(state["value"])


@register(KL_CONTROLLERS, "adaptive")
class AdaptiveKLController:
    """kl_coef steered so that the response KL tracks `target` (Ziegler et al. 2019, sec. 2.2)."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon (Ziegler et al. 2019, sec. 2.2).
        current_kl: batch mean of the per-response KL (summed over tokens); n_steps: responses in the batch."""
        # the clip bounds the step, so one noisy batch moves beta only a little
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    @classmethod
    def from_state(cls, state: dict) -> "AdaptiveKLController":
        _check_kind(state, "adaptive")
        return cls(state["value"], state["target"], state["horizon"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state is for a {state.get('kind')!r} KL controller, not {kind!r}")


def make_kl_controller(kind: str, init_coef: float, target: float | None, horizon: int) -> KLController:
    """A new controller by name ("fixed" ignores target and horizon; "adaptive" needs target > 0, horizon > 0)."""
    cls = lookup(KL_CONTROLLERS, kind, "KL controller")
    if cls is FixedKLController:
        return FixedKLController(init_coef)
    if target is None:
        raise ValueError("adaptive KL control needs a target KL")
    return AdaptiveKLController(init_coef, target, horizon)
