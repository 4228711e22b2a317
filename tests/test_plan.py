"""The plan file: round trip, atomic save, every validation error, runtime arrays."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from dfa2_jax.plan.methods import ARROW, CACHE, CFG_SHARE, FULL, WARS
from dfa2_jax.models.configs import FluxConfig, SD3Config
from dfa2_jax.plan import Plan, PlanError, image_tokens, model_info_for

SD3_SMALL = SD3Config(num_layers=2, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                      dual_attention_layers=(0,))
FLUX_SMALL = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                        axes_dims_rope=(4, 4, 8))


def sd3_info():
    return model_info_for(SD3_SMALL, text_tokens=16)


def good_dict():
    """3 steps, 3 layers (T0, T0b, T1), 4 heads."""
    info = sd3_info()
    assert info["layers"] == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    methods = ["full", "cache", "arrow:8", "wars:16", "cfg_share"]
    full = [[0] * 4 for _ in range(3)]
    step1 = [[1, 2, 3, 4], [0, 0, 0, 0], [1, 1, 1, 1]]
    step2 = [[2, 1, 3, 0], [2, 2, 2, 2], [1, 1, 1, 1]]
    return {"format": "dfa2-plan", "version": 1, "model": info, "steps": 3, "methods": methods,
            "assignment": [full, step1, step2], "calibration": {"delta": 0.6, "resolution": [1024, 1024]},
            "stats": {"attention_flops_kept": 0.5}}


def write(tmp_path, d, name="plan.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return str(p)


def test_round_trip_and_layout(tmp_path):
    plan = Plan.from_dict(good_dict())
    path = str(tmp_path / "plan.json")
    plan.save(path)
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # no temp file left
    back = Plan.load(path)
    assert back == plan
    assert back.assignment.dtype == np.int32 and back.assignment.shape == (3, 3, 4)
    text = open(path).read()
    d = json.loads(text)
    assert list(d) == ["format", "version", "model", "steps", "methods", "assignment", "calibration", "stats"]
    assert d == good_dict()
    # one line per step for the assignment
    assert sum(1 for line in text.splitlines() if line.strip().startswith("[[")) == 3
    plan.save(path)  # overwrite: identical bytes
    assert open(path).read() == text


def test_save_failure_leaves_original_and_no_temp(tmp_path, monkeypatch):
    plan = Plan.from_dict(good_dict())
    path = str(tmp_path / "plan.json")
    plan.save(path)
    before = open(path).read()
    other = Plan.all_full(sd3_info(), 2)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]
    assert open(path).read() == before


def test_save_refuses_invalid_plan(tmp_path):
    plan = Plan.from_dict(good_dict())
    plan.assignment[0, 0, 0] = 1  # cache at step 0
    with pytest.raises(PlanError, match="step 0 must be 'full'"):
        plan.save(str(tmp_path / "plan.json"))
    assert os.listdir(tmp_path) == []


def _mut(path, value):
    def f(d):
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return d
    return f


BAD = [
    ("wrong format", _mut(["format"], "dfa-plan"), r"format = 'dfa-plan': not a dfa2 plan"),
    ("wrong version", _mut(["version"], 2), r"version = 2 is not supported \(expected 1\)"),
    ("missing assignment", _mut(["assignment"], KeyError), r"missing field 'assignment'"),
    ("missing steps", _mut(["steps"], KeyError), r"missing field 'steps'"),
    ("missing model field", _mut(["model", "head_dim"], KeyError), r"missing field model.head_dim"),
    ("unknown field", _mut(["extra"], 1), r"unknown field\(s\) \['extra'\]"),
    ("bad family", _mut(["model", "family"], "pixart"), r"model.family = 'pixart'"),
    ("text position", _mut(["model", "text_position"], "first"), r"model.text_position = 'first'"),
    ("steps", _mut(["steps"], 0), r"steps = 0 must be an integer >= 1"),
    ("step count", _mut(["steps"], 4), r"assignment has 3 entries but the plan has 4 steps"),
    ("layer count", lambda d: (d["assignment"][1].pop(), d)[1],
     r"assignment\[1\] has 2 entries but the plan has 3 layers \(model.layers\)"),
    ("head count", lambda d: (d["model"].update(num_heads=5), d)[1],
     r"assignment\[0\]\[0\] has 4 entries but the plan has 5 heads"),
    ("unknown method", _mut(["methods", 2], "sliding:8"), r"methods\[2\]: unknown method 'sliding:8'"),
    ("non-canonical method", _mut(["methods", 2], "arrow:08"), r"methods\[2\] = 'arrow:08': write it as 'arrow:8'"),
    ("duplicate method", _mut(["methods", 2], "cache"), r"methods: 'cache' appears more than once"),
    ("index out of range", _mut(["assignment", 2, 2, 3], 9),
     r"plan.json: assignment\[2\]\[2\]\[3\] = 9 is not an index into methods \(5 methods\)"),
    ("negative index", _mut(["assignment", 1, 0, 0], -1), r"assignment\[1\]\[0\]\[0\] = -1 is not an index"),
    ("float entry", _mut(["assignment", 1, 0, 0], 1.5), r"assignment\[1\]\[0\]\[0\] = 1.5 must be an integer"),
    ("bool entry", _mut(["assignment", 1, 0, 0], True), r"assignment\[1\]\[0\]\[0\] = True must be an integer"),
    ("step 0 not full", _mut(["assignment", 0, 2, 1], 2),
     r"assignment\[0\]\[2\]\[1\] = 2 \('arrow:8'\): step 0 must be 'full' for every head"),
    ("cache at step 0", _mut(["assignment", 0, 1, 3], 1),
     r"assignment\[0\]\[1\]\[3\] = 1 \('cache'\): step 0 must be 'full' .*nothing is cached"),
    ("calibration type", _mut(["calibration"], [1]), r"calibration must be an object or null"),
]


@pytest.mark.parametrize("name,mutate,match", BAD, ids=[b[0] for b in BAD])
def test_bad_plans_name_file_and_field(tmp_path, name, mutate, match):
    path = write(tmp_path, mutate(good_dict()))
    with pytest.raises(PlanError, match=match) as e:
        Plan.load(path)
    assert str(e.value).startswith(f"{path}: ")


def test_wars_single_k_per_head(tmp_path):
    d = good_dict()
    d["methods"].append("wars:8")
    d["assignment"][2][0][2] = 5  # head 2 of layer 0: wars:16 at step 1, wars:8 at step 2
    with pytest.raises(PlanError, match=r"layer 'transformer_blocks.0.attn' head 2 uses \['wars:16', 'wars:8'\] at "
                                        r"steps \[1, 2\]: one head must use a single wars k"):
        Plan.load(write(tmp_path, d))


def test_cfg_methods_need_cfg(tmp_path):
    plan = Plan.from_dict(good_dict())
    plan.validate(cfg=True)
    with pytest.raises(PlanError, match=r"assignment\[1\]\[0\]\[3\] = 4 \('cfg_share'\).*cfg=False"):
        plan.validate(cfg=False)
    d = good_dict()
    d["model"] = model_info_for(FLUX_SMALL)
    d["model"]["layers"] = d["model"]["layers"] + ["extra.attn"]
    d["model"]["num_heads"] = 4
    flux = Plan.load(write(tmp_path, d))  # FLUX with true CFG can share: loading does not know the run
    flux.validate(cfg=True)
    with pytest.raises(PlanError, match=r"CFG-sharing method needs classifier-free guidance, but FLUX has no"):
        flux.validate(cfg=False)
    d["assignment"][1][0][3] = 0
    Plan.load(write(tmp_path, d)).validate(cfg=False)  # listed but unused: fine


def test_window_larger_than_image():
    plan = Plan.from_dict(good_dict())
    plan.validate(n_img=32)  # 32 // 16 = 2, 32 // 32 = 1
    with pytest.raises(PlanError, match=r"method 'wars:16' at 31 image tokens: the band half-width 31 // \(2·16\) = 0 "
                                        r"is empty \(window larger than the image\)"):
        plan.validate(n_img=31)
    with pytest.raises(PlanError, match="window larger than the image"):
        plan.to_arrays(16)


@pytest.mark.parametrize("text,match", [
    ('{"format": "dfa2-plan", "version": 1, "model": {"family": "sd3"', r"truncated \(line 1"),
    ("not json at all", r"not valid JSON \(line 1 column 1"),
    ("", r"empty file"),
    ("[1, 2]", r"expected a JSON object, got list"),
])
def test_truncated_or_not_json(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PlanError, match=match):
        Plan.load(path)


def test_binary_and_missing_file(tmp_path):
    p = tmp_path / "x_head_option_0.2.json"
    p.write_bytes(b"PK\x03\x04\xff\xfe\x00")
    with pytest.raises(PlanError, match="binary content.*dfa2 plan import"):
        Plan.load(str(p))
    with pytest.raises(PlanError, match="no such plan file"):
        Plan.load(str(tmp_path / "missing.json"))
    good = json.dumps(good_dict())
    with pytest.raises(PlanError, match="truncated"):
        Plan.load(write(tmp_path, good[: len(good) // 2]))


@pytest.mark.parametrize("field,value,match", [
    ("family", "flux", r"model.family = 'sd3' but the model has family = 'flux'"),
    ("num_heads", 24, r"model.num_heads = 4 but the model has num_heads = 24"),
    ("head_dim", 64, r"model.head_dim = 8 but the model has head_dim = 64"),
    ("text_tokens", 333, r"model.text_tokens = 16 but the model has text_tokens = 333"),
    ("text_position", "first", r"model.text_position = 'last' but the model has text_position = 'first'"),
    ("layers", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
     r"model.layers has 3 layers but the model has 2 attention layers"),
    ("layers", ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.2.attn"],
     r"model.layers\[1\] = 'transformer_blocks.0.attn2' but the model's layer 1 is 'transformer_blocks.1.attn'"),
])
def test_validate_against_model(field, value, match):
    plan = Plan.from_dict(good_dict())
    plan.validate(sd3_info())
    other = {**sd3_info(), field: value}
    with pytest.raises(PlanError, match=match):
        plan.validate(other)


def test_to_arrays():
    plan = Plan.from_dict(good_dict())
    n = 4096
    codes, hw, resid = plan.to_arrays(n)
    assert codes.dtype == hw.dtype == resid.dtype == np.int32
    assert codes.shape == hw.shape == (3, 3, 4) and resid.shape == (3, 4)
    np.testing.assert_array_equal(codes[0], FULL)
    np.testing.assert_array_equal(codes[1], [[CACHE, ARROW, WARS, CFG_SHARE], [FULL] * 4, [CACHE] * 4])
    np.testing.assert_array_equal(hw[1], [[-1, n // 16, n // 32, -1], [-1] * 4, [-1] * 4])
    np.testing.assert_array_equal(hw[2], [[n // 16, -1, n // 32, -1], [n // 16] * 4, [-1] * 4])
    np.testing.assert_array_equal(resid, [[-1, -1, n // 32, -1], [-1] * 4, [-1] * 4])
    # one plan serves every resolution: windows scale with the image-token count
    _, hw2, _ = plan.to_arrays(4 * n)
    np.testing.assert_array_equal(hw2[hw2 > 0], 4 * hw[hw > 0])


def test_residual_steps():
    info = {**sd3_info(), "layers": ["transformer_blocks.0.attn"], "num_heads": 1}
    seq = ["full", "wars:8", "full", "cache", "wars:8", "full", "full", "arrow:8"]
    methods = ["full", "wars:8", "cache", "arrow:8"]
    a = np.array([[[methods.index(m)]] for m in seq], np.int32)
    plan = Plan(info, len(seq), methods, a)
    plan.validate()
    np.testing.assert_array_equal(plan.residual_steps()[:, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0])


def test_all_full_and_model_info():
    info = model_info_for(SD3Config.v35_medium())
    assert info["family"] == "sd3" and info["text_position"] == "last" and info["text_tokens"] == 333
    assert len(info["layers"]) == 24 + 13 and info["layers"][1] == "transformer_blocks.0.attn2"
    assert info["num_heads"] == 24 and info["head_dim"] == 64
    finfo = model_info_for(FluxConfig.dev())
    assert finfo["text_position"] == "first" and finfo["text_tokens"] == 512 and len(finfo["layers"]) == 57
    assert finfo["layers"][19] == "single_transformer_blocks.0.attn"
    plan = Plan.all_full(finfo, 28)
    codes, hw, resid = plan.to_arrays(4096)
    assert codes.shape == (28, 57, 24) and (codes == FULL).all() and (hw == -1).all() and (resid == -1).all()
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_nested_list_assignment_equals_array():
    d = good_dict()
    a = Plan.from_dict(copy.deepcopy(d))
    b = Plan(d["model"], 3, d["methods"], np.array(d["assignment"], np.int64), d["calibration"], d["stats"])
    assert a == b and b.assignment.dtype == np.int32


def test_image_tokens():
    assert image_tokens(1024) == 4096
    assert image_tokens(2048) == 16384
    assert image_tokens((768, 1024)) == 48 * 64
    assert image_tokens(64, vae_scale_factor=2, patch=2) == 256
    with pytest.raises(ValueError, match="multiples of"):
        image_tokens(1000)


def test_assignment_set_as_lists_or_floats():
    plan = Plan.from_dict(good_dict())
    plan.assignment = good_dict()["assignment"]  # lists set after construction: normalised by validate
    plan.validate()
    assert plan.assignment.dtype == np.int32
    plan.assignment = np.array(good_dict()["assignment"], np.float32)
    with pytest.raises(PlanError, match=r"assignment\[0\]\[0\]\[0\] = 0.0 must be an integer"):
        plan.validate()


def test_directory_is_not_a_plan(tmp_path):
    with pytest.raises(PlanError, match="cannot read the plan"):
        Plan.load(str(tmp_path))


def test_numpy_metadata_is_written_as_json(tmp_path):
    d = good_dict()
    plan = Plan.from_dict(d)
    plan.stats = {"attention_flops_kept": np.float32(0.5), "per_layer": np.array([0.25, 1.0])}
    path = str(tmp_path / "plan.json")
    plan.save(path)
    assert Plan.load(path).stats == {"attention_flops_kept": 0.5, "per_layer": [0.25, 1.0]}
