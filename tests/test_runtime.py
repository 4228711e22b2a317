"""The head-wise compression runtime inside the scanned sampler equals hand-written step-by-step references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfa2_jax.plan import methods as M
from dfa2_jax.models.attention import arrow_attention_banded, dense_attention
from dfa2_jax.runtime import RuntimeSpec
from dfa2_jax.sample import PlanArrays, denoise, velocity
from tests.oracles import brute_force_mask, denoise_loop, masked_attention
from pallas_kernels import arrow_attention_reference, arrow_mask
from dfa2_jax.scheduler import euler_step

from tests.tiny_setups import flux_setup, sd3_setup

STEPS = 4


# One compile per drawn layout instead of one per primitive and shape (arrow_mask runs op by op otherwise); the
# half-window is traced.
_arrow_mask_jit = jax.jit(arrow_mask, static_argnums=(0, 1, 2))


@given(s_img=st.integers(1, 40), text=st.integers(0, 9), text_first=st.booleans(), hw=st.integers(-1, 45))
@settings(max_examples=150, deadline=None)
def test_arrow_mask_equals_official_formula(s_img, text, text_first, hw):
    mask = np.asarray(_arrow_mask_jit(s_img + text, text, text_first, hw))
    np.testing.assert_array_equal(mask, brute_force_mask(s_img + text, text, text_first, hw))


@given(k=st.integers(1, 64), n_img=st.integers(1, 70000))
def test_half_window_is_official(k, n_img):
    assert M.parse_method(f"arrow:{k}").half_window(n_img) == (n_img // k) // 2
    assert M.parse_method("cache").half_window(n_img) == -1


def test_parse_method_errors():
    for bad in ("arrow", "arrow:0", "window:8", "cfg_share+cache", "", "arrow:x"):
        with pytest.raises(ValueError, match="method"):
            M.parse_method(bad)
    assert M.parse_method("cfg_share+arrow:16") == M.Method(M.CFG_SHARE_ARROW, 16)


# --------------------------------------------------------------------------------------- tiny set-ups ---
def _sd3():
    return sd3_setup(batch=2, steps=STEPS)


def _flux():
    return flux_setup(batch=2, steps=STEPS, heads=2)


SETUPS = {"sd3": _sd3, "flux": _flux}


def _arrays(codes, hw, resid):
    return PlanArrays(np.asarray(codes, np.int32), np.asarray(hw, np.int32), np.asarray(resid, np.int32))


def _random_plan(tr, rng, allowed, *, k_choices=(2, 4), n_img=12, ast_layer=None):
    layers, heads = len(tr.attention_layer_names()), tr.config.num_attention_heads
    codes = rng.choice(allowed, size=(STEPS, layers, heads)).astype(np.int32)
    codes[0] = M.FULL
    hw = np.full(codes.shape, -1, np.int32)
    resid = np.full((layers, heads), -1, np.int32)
    ks = rng.choice(k_choices, size=(layers, heads))
    for idx in np.ndindex(codes.shape):
        if codes[idx] in M.WINDOWED:
            hw[idx] = M.Method(int(codes[idx]), int(ks[idx[1:]])).half_window(n_img)
    for lh in np.ndindex(layers, heads):
        if (codes[(slice(None),) + lh] == M.WARS).any():
            resid[lh] = M.Method(M.WARS, int(ks[lh])).half_window(n_img)
    if ast_layer is not None:
        codes[2, ast_layer] = M.CACHE
        hw[2, ast_layer] = -1
    return _arrays(codes, hw, resid)


# ----------------------------------------------------------------------- hand-written step reference ---
class RefRuntime:
    """Per head, per step, the methods written out plainly (loops over heads, no masks-by-where)."""

    def __init__(self, codes, hw, resid_w, store, cfg):
        self.codes, self.hw, self.resid_w, self.store, self.cfg = codes, hw, resid_w, store, cfg

    def __call__(self, q, k, v, *, layer, layout):
        outs = []
        old = self.store.get(layer, {})
        new_resid = []
        s = q.shape[1]
        for h in range(q.shape[2]):
            qh, kh, vh = q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1]
            code, w = int(self.codes[layer, h]), int(self.hw[layer, h])

            def band(width):
                return masked_attention(qh, kh, vh, arrow_mask(s, layout.text_len, layout.text_first,
                                                                    np.array([width])))

            full = dense_attention(qh, kh, vh)
            if code == M.FULL:
                o = full
            elif code == M.ARROW:
                o = band(w)
            elif code == M.CACHE:
                o = old["heads"][:, :, h:h + 1]
            elif code == M.WARS:
                o = band(w) + old["resid"][:, :, h:h + 1]
            elif code in (M.CFG_SHARE, M.CFG_SHARE_ARROW):
                half = q.shape[0] // 2
                cond_q, cond_k, cond_v = qh[half:], kh[half:], vh[half:]
                if code == M.CFG_SHARE:
                    oc = dense_attention(cond_q, cond_k, cond_v)
                else:
                    oc = masked_attention(cond_q, cond_k, cond_v,
                                            arrow_mask(s, layout.text_len, layout.text_first, np.array([w])))
                o = jnp.concatenate([oc, oc], axis=0)
            outs.append(o)
            rw = int(self.resid_w[layer, h])
            if rw < 0:
                new_resid.append(jnp.zeros_like(full))
            else:
                new_resid.append(full - band(rw) if code == M.FULL else old["resid"][:, :, h:h + 1])
        o = jnp.concatenate(outs, axis=2)
        self.store[layer] = {"heads": o, "resid": jnp.concatenate(new_resid, axis=2)}
        return o

    def run_layer(self, layer, compute):
        return compute()


def _reference(tr, cond, latents, t, s, plan, family, do_cfg):
    model = tr.module()
    store = {}
    x = latents
    for i in range(len(t)):
        rt = RefRuntime(plan.codes[i], plan.half_windows[i], plan.resid_windows, store, do_cfg)
        x = euler_step(x, velocity(model, x, t[i], cond, family=family, do_cfg=do_cfg, runtime=rt), s[i], s[i + 1])
    return np.asarray(x)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_all_full_plan_is_the_dense_sampler_bitwise(name):
    tr, cond, latents, t, s, kw, _ = SETUPS[name]()
    layers, heads = len(tr.attention_layer_names()), tr.config.num_attention_heads
    plan = _arrays(np.zeros((STEPS, layers, heads)), np.full((STEPS, layers, heads), -1), np.full((layers, heads), -1))
    dense = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, **kw)
    planned = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    np.testing.assert_array_equal(np.asarray(planned), np.asarray(dense))


CASES = {
    "arrow+cache": [M.FULL, M.ARROW, M.CACHE],
    "wars": [M.FULL, M.WARS, M.ARROW],
    "cfg_share": [M.FULL, M.CFG_SHARE, M.CFG_SHARE_ARROW, M.CACHE],
}


@pytest.mark.parametrize("name,case", [("sd3", c) for c in CASES] + [("flux", "arrow+cache"), ("flux", "wars")])
def test_methods_equal_step_by_step_reference(name, case):
    tr, cond, latents, t, s, kw, (n_img, _) = SETUPS[name]()
    plan = _random_plan(tr, np.random.default_rng(hash(case) % 2**32), CASES[case], n_img=n_img)
    assert not (plan.codes[1:] == M.FULL).all()
    ours = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    looped = denoise_loop(tr.graphdef, tr.state, latents, cond, t, s, plan=plan, **kw)
    ref = _reference(tr, cond, latents, t, s, plan, **kw)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(ours), rtol=1e-6, atol=1e-6)
    dense = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, **kw)
    assert np.abs(np.asarray(ours) - np.asarray(dense)).max() > 1e-4  # the plan really changed something


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_ast_layer_skip_equals_caching_every_head(name, monkeypatch):
    tr, cond, latents, t, s, kw, (n_img, _) = SETUPS[name]()
    plan = _random_plan(tr, np.random.default_rng(5), [M.FULL, M.ARROW], n_img=n_img, ast_layer=1)
    spec = RuntimeSpec.from_codes(plan.codes, cfg=kw["do_cfg"])
    assert spec.skip_layers[1]
    skipped = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    # the same plan with the skip switched off: layer 1 computes its projections and caches every head
    import dfa2_jax.sample as S

    orig = RuntimeSpec.from_codes

    def no_skip(codes, *, cfg, impl=None):
        sp = orig(codes, cfg=cfg, impl=impl)
        return dataclasses.replace(sp, skip_layers=tuple(False for _ in sp.skip_layers))

    monkeypatch.setattr(S.RuntimeSpec, "from_codes", staticmethod(no_skip))
    cached = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(cached), rtol=1e-6, atol=1e-6)


def test_plan_state_only_for_layers_that_read_it():
    tr, cond, latents, t, s, kw, (n_img, _) = _flux()
    layers, heads = len(tr.attention_layer_names()), tr.config.num_attention_heads
    codes = np.zeros((STEPS, layers, heads), np.int32)
    codes[2, 1, 0] = M.CACHE
    spec = RuntimeSpec.from_codes(codes, cfg=False)
    from dfa2_jax.sample import initial_attention_state

    state = initial_attention_state(tr.graphdef, tr.state, latents, cond, spec, **kw)
    assert list(state) == ["1"] and list(state["1"]) == ["heads"]
    assert state["1"]["heads"].shape == (2, 7 + 12, heads, 16)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        RuntimeSpec.from_codes(np.full((2, 1, 1), M.CFG_SHARE), cfg=False)


# One compile per drawn case instead of one per primitive and shape (the function runs op by op otherwise).
_banded_jit = jax.jit(arrow_attention_banded, static_argnums=(3,), static_argnames=("text_len", "text_first", "block"))


def _masked_attention_f64(q, k, v, mask):
    """Attention in float64 numpy with one [S, S] mask for every head: q, k, v [B, S, H, D] -> [B, S, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@given(n_img=st.integers(1, 70), text=st.integers(0, 9), text_first=st.booleans(), hw=st.integers(-1, 80),
       block=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_banded_arrow_equals_masked_reference(n_img, text, text_first, hw, block, seed):
    """The banded form against masked attention over the official mask formula (loops), in float64 numpy."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n_img + text, 3, 8)), jnp.float32) for _ in range(3))
    ref = _masked_attention_f64(q, k, v, brute_force_mask(n_img + text, text, text_first, hw))
    out = _banded_jit(q, k, v, hw, text_len=text, text_first=text_first, block=block)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


def test_runtime_through_the_pallas_kernel_in_interpret_mode():
    """The same plan (arrow, cache, wars, an AST layer) through the Pallas kernel (interpret mode) and the jnp
    reference give the same latents."""
    tr, cond, latents, t, s, kw, (n_img, _) = _flux()
    plan = _random_plan(tr, np.random.default_rng(11), [M.FULL, M.ARROW, M.CACHE, M.WARS], n_img=n_img, ast_layer=2)
    ref = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    assert RuntimeSpec.from_codes(plan.codes, cfg=False, impl="interpret").impl == "interpret"
    out = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, attention_impl="interpret", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="attention implementation 'cuda'"):
        RuntimeSpec.from_codes(plan.codes, cfg=False, impl="cuda")


def test_plan_state_is_donated_and_updated_in_place():
    """The sampler aliases the donated initial head caches to its (dropped) final carry, so the scan updates
    them in place: the compiled sampler's aliased bytes cover every cache (no second copy in temp)."""
    import dfa2_jax
    from dfa2_jax.pipeline import flux_image_ids
    from dfa2_jax.sample import PlanArrays, scan_sampler, plan_inputs
    from dfa2_jax.scheduler import FlowMatchEulerConfig, set_timesteps
    from dfa2_jax.transformer import flux_rope

    cfg = dfa2_jax.FluxConfig(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                              guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    tr = dfa2_jax.random_transformer(cfg, dtype="float32", seed=0)
    cond = {"prompt_embeds": jnp.zeros((1, 8, 32)), "pooled_projections": jnp.zeros((1, 16)),
            "rope": flux_rope(cfg, np.zeros((8, 3)), flux_image_ids(16, 16)), "guidance": None}
    lat = jnp.zeros((1, 64, 8))
    ts, sig = set_timesteps(FlowMatchEulerConfig.flux_schnell(), 3, sigmas=np.linspace(1, 1 / 3, 3))
    codes = np.full((3, 2, 2), M.CACHE, np.int32)
    codes[0] = M.FULL
    plan = PlanArrays(codes, np.full(codes.shape, -1, np.int32), np.full((2, 2), -1, np.int32))
    spec, plan_in = plan_inputs(tr.graphdef, tr.state, lat, cond, ts, plan, family="flux", do_cfg=False)
    arrays = {k: v for k, v in plan_in.items() if k != "state"}
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(plan_in["state"]))
    assert cache_bytes > 0
    compiled = scan_sampler.lower(tr.graphdef, tr.state, lat, cond, jnp.asarray(ts), jnp.asarray(sig), arrays,
                                    plan_in["state"], family="flux", do_cfg=False, report=False,
                                    spec=spec).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    assert mem.alias_size_in_bytes >= cache_bytes + lat.size * lat.dtype.itemsize


def test_concat_in_is_one_dot_and_ties_each_weight_slice_to_its_input_under_heads():
    """``Linear.concat_in`` equals the linear layer on the concatenated input. Without a ``heads`` mesh axis it is
    that one dot (no slice of the kernel: XLA copied the row blocks and summed the partials in f32 through
    memory). Under one, each row slice of the kernel depends on its own input part (an optimization barrier):
    XLA's GPU scheduler otherwise copied the weight slices of all 38 FLUX.1 single blocks at the top of each
    sampler step and kept them alive (3.4 GiB)."""
    from flax import nnx

    from dfa2_jax.models.layers import Linear

    lin = Linear(6 + 10, 4, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((2, 3, n)), jnp.float32) for n in (6, 10))
    want = lin(jnp.concatenate([a, b], -1))
    np.testing.assert_allclose(lin.concat_in([a, b]), want, rtol=1e-5, atol=1e-6)

    jaxpr = jax.make_jaxpr(lambda a, b: lin.concat_in([a, b]))(a, b).jaxpr
    names = [e.primitive.name for e in jaxpr.eqns]
    assert names.count("dot_general") == 1 and "slice" not in names and "optimization_barrier" not in names

    heads = jax.sharding.AbstractMesh((2,), ("heads",))
    with jax.sharding.use_abstract_mesh(heads):
        jaxpr = jax.make_jaxpr(lambda a, b: lin.concat_in([a, b]))(a, b).jaxpr
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == 2
    for eqn, part in zip(barriers, jaxpr.invars):
        assert part in eqn.invars  # the part's input rides with the kernel
        kernel_out = eqn.outvars[0]
        slices = [e for e in jaxpr.eqns if e.primitive.name == "slice" and e.invars[0] is kernel_out]
        assert len(slices) == 1  # the row slice is taken from the barrier's kernel, not the parameter


def test_modulation_dots_each_own_their_input():
    """Every AdaLN's linear takes SiLU(temb) through a barrier together with its own kernel, so XLA cannot merge
    the blocks' modulation dots into one (which copied all their weights into one matrix at every step)."""
    from flax import nnx

    from dfa2_jax.models.layers import AdaLayerNormZero

    norms = [AdaLayerNormZero(8, 3, dtype=jnp.float32, rngs=nnx.Rngs(i)) for i in range(2)]
    emb = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)
    for norm in norms:
        want = norm.linear(jax.nn.silu(emb))
        np.testing.assert_allclose(jnp.concatenate([c[:, 0] for c in norm(emb)], -1), want, rtol=1e-6, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda e: [norm(e) for norm in norms])(emb).jaxpr
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(barriers) == len(dots) == 2
    for barrier, dot in zip(barriers, dots):
        assert set(dot.invars) <= set(barrier.outvars)  # both operands of each dot come out of its own barrier


def test_projections_of_one_input_each_own_their_dot():
    """q, k, v of both streams (and FLUX.1's single-block MLP) each take their input through a barrier with their
    own kernel, so XLA cannot merge the dots of one input (which copied their weights into one matrix per step)."""
    from flax import nnx

    from dfa2_jax.models.layers import Attention

    attn = Attention(8, 2, 4, added_kv=True, qk_norm=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x, c = (jnp.asarray(rng.standard_normal((1, n, 8)), jnp.float32) for n in (6, 3))
    jaxpr = jax.make_jaxpr(lambda x, c: attn(x, c, layer=0, text_first=True))(x, c).jaxpr
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == 6
    for barrier in barriers:  # each barrier feeds one dot, both of whose operands come out of it
        outs = {id(v) for v in barrier.outvars}
        users = [e for e in jaxpr.eqns if any(id(v) in outs for v in e.invars)]
        assert [e.primitive.name for e in users] == ["dot_general"]
        assert all(id(v) in outs for v in users[0].invars)


def _schedule_recorders(monkeypatch):
    """Fake kernel schedules (row n of a call's table: [n + 100 · has_cache]) and an attention that records the
    schedule row it was given (None: none, "traced": inside a lax.cond branch)."""
    from dfa2_jax import runtime as R

    calls, seen = [], []

    def fake_schedules(q, half_windows, *, text_len, text_first, has_cache, implementation=None, interpret=False,
                       config=None):
        calls.append((half_windows.shape, has_cache, interpret))
        return jnp.arange(half_windows.shape[0])[:, None] + 100 * has_cache

    def recording_attention(q, k, v, hw, *, schedule=None, implementation=None, interpret=False, **kw):
        try:
            seen.append(None if schedule is None else int(schedule[0]))
        except jax.errors.ConcretizationTypeError:
            seen.append("traced")
        return arrow_attention_reference(q, k, v, hw, **kw)

    monkeypatch.setattr(R, "arrow_schedules", fake_schedules)
    monkeypatch.setattr(R, "arrow_attention", recording_attention)
    return calls, seen


def _schedule_case():
    """2 steps, 3 layers (the last skippable), 2 heads; q [1, 11, 2, 16]; the initial state."""
    codes = np.array([[[M.ARROW, M.FULL], [M.CACHE, M.ARROW], [M.CACHE, M.CACHE]],
                      [[M.FULL, M.ARROW], [M.ARROW, M.CACHE], [M.ARROW, M.FULL]]], np.int32)
    spec = RuntimeSpec.from_codes(codes, cfg=False, impl="interpret")
    assert spec.skip_layers == (False, False, True)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 11, 2, 16)), jnp.float32)
    zeros = jnp.zeros_like(q)
    state = {"1": {"heads": zeros}, "2": {"heads": zeros, "out": jnp.zeros((1, 11, 32))}}
    return codes, spec, q, state


def _run_step(rt, q, layout):
    for layer in range(3):
        rt.run_layer(layer, lambda layer=layer: (rt(q, q, q, layer=layer, layout=layout).reshape(1, 11, 32), None))


def test_runtime_computes_kernel_schedules_once_per_plan(monkeypatch):
    """plan_schedules computes the kernel's launch schedules of every step and layer once per kind of call (here:
    without and with a cache), and each step's runtime hands each layer its own row, a skippable layer's lax.cond
    branch too."""
    from dfa2_jax.models.attention import TokenLayout
    from dfa2_jax.runtime import PlanRuntime, call_kind, plan_schedules

    calls, seen = _schedule_recorders(monkeypatch)
    codes, spec, q, state = _schedule_case()
    layout = TokenLayout(text_len=3, text_first=True)
    kinds = {layer: call_kind(spec, layer, q, layout) for layer in range(3)}
    hw = jnp.full((2, 3, 2), 4, jnp.int32)
    tables = plan_schedules(spec, kinds, jnp.asarray(codes), hw)
    assert calls == [((6, 2), False, True), ((6, 2), True, True)]  # [steps · layers, heads] per kind
    assert {k: v.shape for k, v in tables.items()} == {kinds[0]: (2, 1, 3, 1), kinds[1]: (2, 1, 3, 1)}
    for t in range(2):
        rt = PlanRuntime(spec, jnp.asarray(codes[t]), hw[t], jnp.full((3, 2), -1, jnp.int32), state,
                         schedules={k: v[t] for k, v in tables.items()})
        _run_step(rt, q, layout)
        state = rt.new_state
    assert seen == [0, 101, "traced", 3, 104, "traced"]


def test_runtime_without_given_schedules_computes_them_once_per_step(monkeypatch):
    """A runtime given no schedules (a step run on its own) computes them once per step and kind of call; a
    kind first met inside a skippable layer's lax.cond gets none (a value made there cannot serve later layers)."""
    from dfa2_jax.models.attention import TokenLayout
    from dfa2_jax.runtime import PlanRuntime

    calls, seen = _schedule_recorders(monkeypatch)
    codes, spec, q, state = _schedule_case()
    rt = PlanRuntime(spec, jnp.asarray(codes[0]), jnp.full((3, 2), 4, jnp.int32), jnp.full((3, 2), -1, jnp.int32),
                     state)
    _run_step(rt, q, TokenLayout(text_len=3, text_first=True))
    assert calls == [((3, 2), False, True), ((3, 2), True, True)]
    assert seen == [0, 101, "traced"]
    spec2 = dataclasses.replace(spec, cache_layers=(False, False, True))  # layer 2's kind first met in the cond
    calls.clear(), seen.clear()
    rt = PlanRuntime(spec2, jnp.asarray(codes[0]), jnp.full((3, 2), 4, jnp.int32), jnp.full((3, 2), -1, jnp.int32),
                     {"2": state["2"]})
    _run_step(rt, q, TokenLayout(text_len=3, text_first=True))
    assert calls == [((3, 2), False, True)] and seen == [0, 1, None]


def test_sampler_computes_kernel_schedules_before_its_scan(monkeypatch):
    """The compiled sampler computes the launch schedules of all steps and layers once, before its scan (one
    computation per kind of call over [steps · layers, heads]), and every kernel call in the step gets its row."""
    calls, seen = _schedule_recorders(monkeypatch)
    tr, cond, latents, t, s, kw, (n_img, _) = _flux()
    plan = _random_plan(tr, np.random.default_rng(3), [M.FULL, M.ARROW, M.CACHE], n_img=n_img)
    spec = RuntimeSpec.from_codes(plan.codes, cfg=False, impl="interpret")
    denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, attention_impl="interpret", **kw)
    steps, layers, heads = plan.codes.shape
    compressed = [i for i in range(layers) if not spec.dense_layers[i]]
    assert sorted(calls) == sorted({((steps * layers, heads), spec.cache_layers[i], True) for i in compressed})
    assert seen == ["traced"] * len(compressed)


@pytest.mark.parametrize("name,allowed", [("flux", (M.FULL, M.ARROW, M.CACHE, M.WARS)),
                                          ("sd3", (M.FULL, M.CFG_SHARE, M.CFG_SHARE_ARROW, M.CACHE, M.ARROW))])
def test_head_cache_carried_longer_than_the_sequence_gives_the_same_latents(name, allowed, monkeypatch):
    """The carried head caches are as long as the kernel writes in place (the Mosaic GPU kernel: S padded to its
    tiles); here 5 rows longer on the CPU: the state has those rows and the latents are those of the unpadded
    carry, with wars residuals, CFG sharing and a skipped (AST) layer, which re-pad or pass the cache on."""
    from dfa2_jax import runtime as R
    from dfa2_jax import sample as S

    tr, cond, latents, t, s, kw, (n_img, _) = SETUPS[name]()
    plan = _random_plan(tr, np.random.default_rng(17), list(allowed), n_img=n_img, ast_layer=1)
    ref = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    monkeypatch.setattr(R, "cache_length", lambda q, *a, **k: q.shape[1] + 5)
    monkeypatch.setattr(S, "_PROBES", {})
    spec = RuntimeSpec.from_codes(plan.codes, cfg=kw["do_cfg"])
    state = S.initial_attention_state(tr.graphdef, tr.state, jnp.array(latents), cond, spec, **kw)
    kinds = S.plan_probe(tr.graphdef, tr.state, jnp.array(latents), cond, spec, **kw)[1]  # {layer: (q shape, …)}
    rows = {int(i): x["heads"].shape[1] for i, x in state.items() if "heads" in x}
    assert rows and rows == {i: kinds[i][0][1] + 5 for i in rows}
    out = denoise(tr.graphdef, tr.state, jnp.array(latents), cond, t, s, plan=plan, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
