import json

import pytest

from rlhf_core.kl_control import KL_CONTROLLERS, AdaptiveKLController, FixedKLController, make_kl_controller


def test_registry_keys():
    assert set(KL_CONTROLLERS) == {"fixed", "adaptive"}
    assert KL_CONTROLLERS["adaptive"] is AdaptiveKLController


def test_adaptive_update_clips_high():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=512)  # 12 / 6 - 1 = 1, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))


def test_adaptive_update_clips_low():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=0.0, n_steps=512)  # 0 / 6 - 1 = -1, clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))


def test_adaptive_update_inside_clip_range_and_compounding():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=512)  # 6.6 / 6 - 1 = 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 512 / 10000))
    ctl.update(current_kl=5.7, n_steps=256)  # 5.7 / 6 - 1 = -0.05
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 512 / 10000) * (1 - 0.05 * 256 / 10000))
    ctl.update(current_kl=6.0, n_steps=512)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 512 / 10000) * (1 - 0.05 * 256 / 10000))


def test_fixed_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e6):
        ctl.update(kl, n_steps=512)
    assert ctl.value == 0.05


@pytest.mark.parametrize("ctl", [FixedKLController(0.05), AdaptiveKLController(0.1, 6.0, 10000)])
def test_state_dict_round_trip_through_json(ctl):
    ctl.update(12.0, 512)
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = KL_CONTROLLERS[state["kind"]].from_state(state)
    assert type(restored) is type(ctl)
    assert restored.state_dict() == ctl.state_dict()
    restored.update(3.0, 64)  # the restored controller continues exactly where the original was
    ctl.update(3.0, 64)
    assert restored.value == ctl.value


def test_from_state_wrong_kind_raises():
    with pytest.raises(ValueError, match="'fixed'"):
        AdaptiveKLController.from_state(FixedKLController(0.1).state_dict())


def test_make_kl_controller():
    fixed = make_kl_controller("fixed", 0.05, target=None, horizon=10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10000)


def test_make_kl_controller_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        make_kl_controller("pid", 0.1, target=6.0, horizon=10000)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1, target=None, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller("adaptive", 0.1, target=6.0, horizon=0)
