"""Official DiTFastAttn V1/V2 plan files: import (files written by real torch.save), export (read back by
torch.load), round trips, and the restricted unpickler refusing code payloads."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfa2_jax.models.configs import FluxConfig, SD3Config
from converters.torch_pickle import LEGACY_MAGIC, TorchFileError, load_torch_file, save_torch_file
from dfa2_jax.plan.official import OfficialFormatError, export_official, import_official, import_v1, k_for_half_window
from dfa2_jax.plan import Plan, PlanError, model_info_for

N_IMG = 256  # 256 px, VAE 8, patch 2: arrow:8 -> 16, arrow:16 -> 8, arrow:32 -> 4
FLUX = model_info_for(FluxConfig(num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=3,
                                 axes_dims_rope=(4, 4, 8)), text_tokens=32)
SD3 = model_info_for(SD3Config(num_layers=2, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                               dual_attention_layers=(0,)), text_tokens=16)


def official_flux_files(tmp_path, legacy=False):
    """What the official FLUX calibration saves (dfa_processor_flux_flash.py): every step >= 1 of every transformed
    layer; int32 [H, 2] windows; cached heads have window 0 and are listed in the outputshare dict."""
    w = {8: N_IMG // 16, 16: N_IMG // 32, 32: N_IMG // 64}
    layers = FLUX["layers"]
    head_option, share = {}, {}
    per_step = {
        1: ([-1, w[8], 0], [2]),
        2: ([0, 0, w[32]], [0, 1]),
        3: ([w[16], -1, -1], []),
    }
    for li, layer in enumerate(layers[:2]):  # the single block is left out: dense
        head_option[layer], share[layer] = {}, {}
        for s, (ws, cached) in per_step.items():
            ws = ws if li == 0 else ws[::-1]
            cached = cached if li == 0 else [2 - h for h in cached][::-1]
            t = torch.tensor(ws, dtype=torch.int32)
            head_option[layer][s] = t.repeat_interleave(2, dim=0).view(-1, 2)
            share[layer][s] = sorted(cached)
    p_h, p_s = tmp_path / "flux_256_head_option_0.4.json", tmp_path / "flux_256_outputshare_option_0.4.json"
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    torch.save(head_option, p_h, **kw)
    torch.save(share, p_s, **kw)
    return str(p_h), str(p_s), head_option, share


EXPECTED_L0 = [["full"] * 3, ["full", "arrow:8", "cache"], ["cache", "cache", "arrow:32"], ["arrow:16", "full", "full"]]


def names(plan, li):
    return [[plan.methods[i] for i in plan.assignment[s, li]] for s in range(plan.steps)]


@pytest.mark.parametrize("legacy", [False, True])
def test_import_official_torch_save_files(tmp_path, legacy):
    p_h, p_s, _, _ = official_flux_files(tmp_path, legacy)
    plan = import_official(p_h, p_s, FLUX, N_IMG, resolution=256)
    assert plan.steps == 4 and plan.model == FLUX
    assert plan.methods == ["full", "cache", "arrow:8", "arrow:16", "arrow:32"]
    assert names(plan, 0) == EXPECTED_L0
    assert names(plan, 1) == [row[::-1] for row in EXPECTED_L0]
    assert names(plan, 2) == [["full"] * 3] * 4  # absent from the files: dense
    assert plan.calibration == {"source": "DiTFastAttnV2", "resolution": [256, 256], "image_tokens": 256,
                                "delta": 0.4}
    plan.validate(FLUX, n_img=N_IMG)
    # --steps longer than the files: the tail is dense
    assert import_official(p_h, p_s, FLUX, N_IMG, steps=6).steps == 6


def test_import_export_import_identical_and_torch_reads_ours(tmp_path):
    p_h, p_s, head_option, share = official_flux_files(tmp_path)
    plan = import_official(p_h, p_s, FLUX, N_IMG, resolution=256)
    out = tmp_path / "out"
    e_h, e_s = export_official(plan, out, n_img=N_IMG, resolution=256, name="flux")
    assert os.path.basename(e_h) == "flux_256_head_option_0.4.json"
    assert os.path.basename(e_s) == "flux_256_outputshare_option_0.4.json"
    again = import_official(e_h, e_s, FLUX, N_IMG, resolution=256)
    assert again == plan
    for weights_only in (True, False):
        ours_h = torch.load(e_h, weights_only=weights_only)
        ours_s = torch.load(e_s, weights_only=weights_only)
        assert list(ours_h) == list(FLUX["layers"])  # every layer (the dense one too)
        for layer in FLUX["layers"][:2]:
            assert list(ours_h[layer]) == [1, 2, 3] and list(ours_s[layer]) == [1, 2, 3]
            for s in (1, 2, 3):
                t = ours_h[layer][s]
                assert isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.shape == (3, 2)
                assert torch.equal(t, head_option[layer][s])
                assert ours_s[layer][s] == share[layer][s] and all(type(h) is int for h in ours_s[layer][s])
        single = FLUX["layers"][2]
        assert all(torch.equal(t, torch.full((3, 2), -1, dtype=torch.int32)) for t in ours_h[single].values())
        assert all(v == [] for v in ours_s[single].values())
    # the official loader moves every tensor to the GPU: plain torch.load + .to() works on ours
    cfg = torch.load(e_h)
    for layer in cfg:
        for s in cfg[layer]:
            cfg[layer][s] = cfg[layer][s].to("cpu")
    # exporting again gives the same bytes (deterministic writer)
    e2 = export_official(again, tmp_path / "out2", n_img=N_IMG, resolution=256, name="flux")
    assert open(e2[0], "rb").read() == open(e_h, "rb").read()


def test_reader_matches_torch_on_assorted_objects(tmp_path):
    obj = {"a": [1, -5, 70000, 2**40, "x", None, True, 1.5, (1, 2, 3, 4)],
           "f": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.array([-(2**40), 3], np.int64),
           "b": np.array([True, False]), "u8": np.arange(3, dtype=np.uint8), 7: {}}
    p = str(tmp_path / "obj.json")
    save_torch_file(obj, p)
    t = torch.load(p, weights_only=True)
    assert t["a"] == obj["a"] and t[7] == {}
    for k in ("f", "i64", "b", "u8"):
        np.testing.assert_array_equal(t[k].numpy(), obj[k])
    back = load_torch_file(p)
    for k in ("f", "i64", "b", "u8"):
        np.testing.assert_array_equal(back[k], obj[k])
        assert back[k].dtype == obj[k].dtype
    # a non-contiguous torch tensor view (storage offset and strides) read without torch
    base = torch.arange(24, dtype=torch.int32).view(4, 6)
    torch.save({"v": base[1:, ::2]}, tmp_path / "view.pt")
    np.testing.assert_array_equal(load_torch_file(tmp_path / "view.pt")["v"], base[1:, ::2].numpy())
    assert sorted(os.listdir(tmp_path)) == ["obj.json", "view.pt"]  # atomic write: no temp file left


def _evil_zip(payload_pickle: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload_pickle)
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins
        return builtins.eval, (self.code,)


@pytest.mark.parametrize("kind", ["torch.save", "zip-eval", "legacy", "bare-pickle", "in-storage-type",
                                  "nested-in-plan"])
def test_malicious_pickle_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    path = tmp_path / "evil_head_option_0.2.json"
    if kind == "torch.save":
        torch.save({"transformer_blocks.0.attn": {1: _System(cmd)}}, path)
    elif kind == "zip-eval":
        path.write_bytes(_evil_zip(pickle.dumps(_Eval(f"open({str(marker)!r}, 'w')"), protocol=2)))
    elif kind == "legacy":
        path.write_bytes(pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                         + pickle.dumps({}, protocol=2) + pickle.dumps(_System(cmd), protocol=2))
    elif kind == "bare-pickle":
        path.write_bytes(pickle.dumps(_System(cmd), protocol=2))
    elif kind == "in-storage-type":  # a torch-looking persistent id whose 'storage type' is posix.system
        payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage" + b"cposix\nsystem\n"
                   + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89)tR.")
        path.write_bytes(_evil_zip(payload))
    else:
        path.write_bytes(_evil_zip(pickle.dumps({"layer": {1: [1, 2, _System(cmd)]}}, protocol=2)))
    with pytest.raises(TorchFileError, match=r"evil_head_option_0.2.json: refusing to load: the pickle asks for "
                                                  r"(posix\.system|__builtin__\.eval), which could run code"):
        load_torch_file(path)
    with pytest.raises(OfficialFormatError, match="refusing to load"):
        import_official(str(path), None, FLUX, N_IMG)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"not": "a torch file"}')
    with pytest.raises(TorchFileError, match="not a torch.save file"):
        load_torch_file(p)
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(TorchFileError, match="x.json: not a readable torch.save file"):
        load_torch_file(p)
    good = tmp_path / "good.json"
    save_torch_file({"a": np.arange(4, dtype=np.int32)}, good)
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="x.json"):
        load_torch_file(p)
    with pytest.raises(TorchFileError, match="no such file"):
        load_torch_file(tmp_path / "missing.json")


def test_import_errors(tmp_path):
    def save(obj, name):
        p = str(tmp_path / name)
        torch.save(obj, p)
        return p

    layer = FLUX["layers"][0]
    with pytest.raises(OfficialFormatError, match=r"layer 'blocks.0.attn' is not an attention layer of the model"):
        import_official(save({"blocks.0.attn": {1: torch.full((3, 2), -1, dtype=torch.int32)}}, "a.json"), None,
                        FLUX, N_IMG)
    with pytest.raises(OfficialFormatError, match=r"\[1\]: shape \[2, 2\], expected \[3, 2\]"):
        import_official(save({layer: {1: torch.full((2, 2), -1, dtype=torch.int32)}}, "b.json"), None, FLUX, N_IMG)
    # 30 is N_img // (2k) for no integer k at 256 tokens (k=4 gives 32, k=5 gives 25)
    with pytest.raises(OfficialFormatError, match=r"c.json: \['transformer_blocks.0.attn'\]\[2\] head 1: half-window "
                                                  r"30 is not N_img // \(2k\) for any integer k"):
        import_official(save({layer: {2: torch.tensor([[-1, -1], [30, 30], [0, 0]], dtype=torch.int32)}}, "c.json"),
                        None, FLUX, N_IMG)
    with pytest.raises(OfficialFormatError, match=r"head 0: \(left, right\) = \(8, 4\)"):
        import_official(save({layer: {1: torch.tensor([[8, 4], [-1, -1], [-1, -1]], dtype=torch.int32)}}, "d.json"),
                        None, FLUX, N_IMG)
    with pytest.raises(OfficialFormatError, match=r"\[1\] head 5 is outside \[0, 3\)"):
        import_official(None, save({layer: {1: [5]}}, "e.json"), FLUX, N_IMG)
    with pytest.raises(PlanError, match=r"step 0 must be 'full'"):
        import_official(None, save({layer: {0: [1]}}, "f.json"), FLUX, N_IMG)


def test_import_asc_variant_and_other_windows():
    # the ASC variant saves [H] windows; a non-candidate k that reproduces the window exactly is kept
    layer = SD3["layers"][0]
    ho = {layer: {1: np.array([-1, 0, 256 // 20, 256 // 16], np.int32)}}
    plan = import_official(ho, {layer: {1: [1]}}, SD3, 256)
    assert names(plan, 0)[1] == ["full", "cache", "arrow:10", "arrow:8"]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 5000), k=st.integers(1, 64))
def test_k_for_half_window(n, k):
    w = n // (2 * k)
    if w == 0:
        return
    k2 = k_for_half_window(w, n)
    assert n // (2 * k2) == w
    same = [j for j in range(1, n // 2 + 1) if n // (2 * j) == w]
    preferred = [p for p in (8, 16, 32) if p in same]
    if preferred:
        assert k2 == preferred[0]
    elif len(same) == 1:
        assert k2 == k


def test_k_for_half_window_error():
    with pytest.raises(ValueError, match="half-window 30 is not N_img // \\(2k\\) for any integer k at 100"):
        k_for_half_window(30, 100)


def v1_plan():
    return [{"attn1": ["full_attn", "output_share", "residual_window_attn", "full_attn+cfg_attn_share"],
             "attn2": ["full_attn", "full_attn", "full_attn", "residual_window_attn+cfg_attn_share"], "ff": None},
            {"attn1": ["full_attn", "residual_window_attn", "output_share", "full_attn"], "attn2": None,
             "ff": ["full_attn"] * 4}]


def _check_v1(plan):
    assert plan.steps == 4 and plan.model == SD3
    assert [row[0] for row in names(plan, 0)] == ["full", "cache", "wars:8", "cfg_share"]
    assert all(len(set(row)) == 1 for row in names(plan, 0))  # whole layer (AST = every head cached)
    assert [row[0] for row in names(plan, 1)] == ["full", "full", "full", "cfg_share+arrow:8"]
    assert [row[0] for row in names(plan, 2)] == ["full", "wars:8", "cache", "full"]


@pytest.mark.parametrize("form", ["object", "json", "torch.save", "dict"])
def test_import_v1(tmp_path, form):
    data = v1_plan()
    if form == "object":
        src = data
    elif form == "json":
        src = str(tmp_path / "v1.json")
        with open(src, "w") as f:
            json.dump(data, f)
    elif form == "torch.save":
        src = str(tmp_path / "v1.json")
        torch.save(data, src)
    else:
        src = {"transformer_blocks.0": data[0], "1": data[1]}
    _check_v1(import_v1(src, SD3))
    assert names(import_v1(data, SD3, window_k=16), 0)[2][0] == "wars:16"


def test_import_v1_errors():
    with pytest.raises(OfficialFormatError, match=r"block 0 attn1: unknown V1 method 'sliding_attn'"):
        import_v1([{"attn1": ["full_attn", "sliding_attn"]}], SD3)
    with pytest.raises(PlanError, match="FLUX has no classifier-free guidance"):
        import_v1([{"attn1": ["full_attn", "full_attn+cfg_attn_share"]}], FLUX)
    with pytest.raises(OfficialFormatError, match="different step counts"):
        import_v1([{"attn1": ["full_attn"] * 3}, {"attn1": ["full_attn"] * 4}], SD3)
    with pytest.raises(OfficialFormatError, match="'transformer_blocks.7.attn', which the model does not have"):
        import_v1([{"attn1": ["full_attn"]}] * 7 + [{"attn1": ["output_share"]}], SD3)


def test_export_refuses_methods_without_official_equivalent(tmp_path):
    plan = import_v1(v1_plan(), SD3)
    with pytest.raises(OfficialFormatError, match=r"v1 plan: method 'wars:8' \(step 1, layer "
                                                  r"'transformer_blocks.1.attn', head 0\) has no DiTFastAttnV2 "
                                                  r"equivalent"):
        export_official(plan, tmp_path, n_img=N_IMG, resolution=256, delta=0.2)
    full = Plan.all_full(SD3, 3)
    with pytest.raises(ValueError, match="no calibration delta"):
        export_official(full, tmp_path, n_img=N_IMG, resolution=256)
    h, s = export_official(full, tmp_path, n_img=N_IMG, resolution=256, name="sd3", delta=0.2)
    assert os.path.basename(h) == "sd3_256_head_option_0.2.json"
    assert import_official(h, s, SD3, N_IMG) == Plan(SD3, 3, ["full"], np.zeros((3, 3, 4), np.int32),
                                                     {"source": "DiTFastAttnV2", "image_tokens": 256, "delta": 0.2})
