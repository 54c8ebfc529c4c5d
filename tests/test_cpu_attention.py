"""The C++ CPU attention kernel against the pure-jnp reference on poisoned pools (NaN in every page slot no
request owns, in the null page and in the queries of padding tokens; page ids permuted; page tables wider
than the longest request), its build and fallback, and the engine's choice of backend."""

import functools
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ragged_paged_attention import make_paged_case

from jaxpage import LLM, SamplingParams
from jaxpage.config import user_cache_dir
from jaxpage.runner import resolve_attention_backend
from pallas_kernels import cpu_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

pytestmark = pytest.mark.skipif(cpu_attention.compiler() is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_attention.load(user_cache_dir() / "kernels")


def check_against_reference(args, atol=2e-6, rtol=2e-5, **kwargs):
    out = jax.jit(functools.partial(cpu_attention.ragged_paged_attention_cpu, **kwargs))(*args)
    expected = jax.jit(functools.partial(ragged_paged_attention_reference, **kwargs))(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=atol, rtol=rtol)
    num_real = int(args[-1][-1])
    np.testing.assert_array_equal(np.asarray(out[num_real:]), 0.0)


# (q_len, kv_len): decodes at lengths 1, page_size - 1, page_size + 1; a fresh prompt of page_size - 1; a
# chunk over a cached prefix; an empty padding row; a prompt longer than one work unit (16 tokens) after a
# prefix.
def _mixed(page_size):
    return [(1, 1), (1, page_size - 1), (1, page_size + 1), (page_size - 1, page_size - 1),
            (page_size + 1, 3 * page_size), (0, 0), (40, 110)]  # fmt: skip


# head_dim 64 and 128 take the kernel's compiled-size paths, 32 the general one; GQA groups 1, 3 and 4.
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(2, 2, 32), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("page_size", [8, 16])
def test_mixed_prefill_and_decode_match_reference(num_q_heads, num_kv_heads, head_dim, page_size):
    q_lens, kv_lens = zip(*_mixed(page_size), strict=True)
    args = make_paged_case(
        page_size + num_q_heads, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, dtype=jnp.float32,
        num_tokens=sum(q_lens) + 3, extra_pages=5,
    )  # fmt: skip
    check_against_reference(args)


@pytest.mark.parametrize("kv_lens", [(1, 7, 9, 0), (200, 3, 0, 0), (16, 17, 15, 33), (5, 700)])
def test_decode_rows_match_reference(kv_lens):
    q_lens = [1 if kv else 0 for kv in kv_lens]
    args = make_paged_case(
        sum(kv_lens), q_lens=q_lens, kv_lens=kv_lens, num_q_heads=9, num_kv_heads=3, head_dim=64,
        page_size=16, dtype=jnp.float32, num_tokens=len(kv_lens), extra_pages=4,
    )  # fmt: skip
    check_against_reference(args)


def test_logits_far_apart_and_an_explicit_scale():
    # Logits spanning ~100 nats exercise the kernel's own exp far below 0 and the online rescaling. float32
    # rounding of logits this large moves the weights by ~1e-5 relative, in the reference as in the kernel.
    q, k_pages, v_pages, *rest = make_paged_case(
        7, q_lens=[3, 1], kv_lens=[50, 33], num_q_heads=4, num_kv_heads=1, head_dim=64, page_size=8,
        dtype=jnp.float32, extra_pages=1,
    )  # fmt: skip
    check_against_reference((q * 8.0, k_pages, v_pages, *rest), atol=2e-5, rtol=2e-4, sm_scale=1.5)


def test_all_padding_step_is_zero():
    args = make_paged_case(
        0, q_lens=[0, 0], kv_lens=[0, 0], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
        dtype=jnp.float32, num_tokens=4, extra_pages=2,
    )  # fmt: skip
    out = jax.jit(cpu_attention.ragged_paged_attention_cpu)(*args)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_other_dtypes_are_refused_by_name():
    q, k_pages, v_pages, *rest = make_paged_case(
        1, q_lens=[1], kv_lens=[3], num_q_heads=2, num_kv_heads=1, head_dim=16, page_size=8,
        dtype=jnp.float32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="float32 k_pages, got bfloat16"):
        cpu_attention.ragged_paged_attention_cpu(q, k_pages.astype(jnp.bfloat16), v_pages, *rest)


def test_auto_takes_the_kernel_for_float32_only(monkeypatch):
    assert resolve_attention_backend("auto", "float32") == "cpu_kernel"
    assert resolve_attention_backend("auto", "bfloat16") == "blocked"
    assert resolve_attention_backend("blocked", "float32") == "blocked"
    with pytest.raises(ValueError, match="attention_backend 'cpu_kernel' runs float32 on the CPU, got dtype"):
        resolve_attention_backend("cpu_kernel", "bfloat16")
    # Another platform: "auto" is Pallas on GPU only, and the CPU kernel is refused before anything builds.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_attention_backend("auto", "float32") == "blocked"
    with pytest.raises(ValueError, match="got dtype 'float32' on 'tpu'"):
        resolve_attention_backend("cpu_kernel", "float32")


def test_without_a_compiler_auto_falls_back_and_cpu_kernel_is_a_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_attention, "_loaded", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("JAXPAGE_CACHE_DIR", str(tmp_path))
    assert resolve_attention_backend("auto", "float32") == "blocked"
    assert "no C++ compiler found" in caplog.text
    with pytest.raises(ValueError, match="attention_backend 'cpu_kernel' could not be built"):
        resolve_attention_backend("cpu_kernel", "float32")


def test_a_compile_error_is_logged_and_falls_back_once(monkeypatch, tmp_path, caplog):
    # A compiler that fails: nothing half-written is left in the cache directory.
    failing = tmp_path / "failing-c++"
    failing.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\necho boom >&2\nexit 1\n'
    )
    failing.chmod(0o755)
    monkeypatch.setattr(cpu_attention, "_loaded", None)
    monkeypatch.setattr(cpu_attention, "_failed_with", None)
    monkeypatch.setenv("CXX", str(failing))
    assert not cpu_attention.load(tmp_path / "kernels")
    assert "boom" in caplog.text
    assert list((tmp_path / "kernels").iterdir()) == []
    # The next engine does not build again with the compiler that failed.
    failing.write_text("#!/bin/sh\nexit 99\n")
    caplog.clear()
    assert not cpu_attention.load(tmp_path / "kernels") and caplog.text == ""


def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_attention, "_loaded", None)
    # This process registered the kernel already; a second library may not take the name.
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *args, **kwargs: None)
    path = cpu_attention._library_path(tmp_path, cpu_attention.compiler())
    path.write_bytes(b"")  # what a crash before the data reached the disk would leave
    assert cpu_attention.load(tmp_path)
    assert "did not load" in caplog.text and path.stat().st_size > 0
    # Readable by the other users of a shared cache directory, as the umask allows.
    assert path.stat().st_mode & 0o777 == 0o755 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _kernel_programs(llm) -> dict[str, bool]:
    """Which compiled forward programs of the engine call the kernel, by their (bucket, kind)."""
    programs = llm.engine.runner._forward_programs
    return {f"{key}": cpu_attention.TARGET in program.as_text() for key, program in programs.items()}


# The tiny model's heads (16 wide, pages of 8) take the portable loops, on decode steps only (prompt chunks
# keep the blocked attention); head_dim 64 with pages of 16 takes the AVX-512 path where it is built, on
# every step. Decode and chunked prefill, each with both CPU backends.
@pytest.mark.parametrize("shape", [[], ["ModelConfig.head_dim = 64", "EngineConfig.page_size = 16"]])
def test_greedy_outputs_equal_the_blocked_backend_and_the_kernel_runs(shape):
    prompts = [[5, 9, 2, 7] * 9, [3, 1, 4, 1, 5, 9, 2, 6], [8] * 50]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in ("cpu_kernel", "blocked"):
        bindings = [*shape, f'EngineConfig.attention_backend = "{backend}"']
        llm = LLM.from_gin(["configs/tiny_test.gin"], bindings)
        assert llm.engine.runner.attention_backend == backend
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        calls = _kernel_programs(llm)
        if backend == "blocked":
            assert not any(calls.values())
        elif cpu_attention.fast_for_prefill(*((16, 64) if shape else (8, 16))):
            assert calls and all(calls.values())
        else:
            assert {key: called for key, called in calls.items() if called} == {
                key: True for key in calls if "decode" in key
            } and any(calls.values())
        llm.engine.close()
    assert outputs["cpu_kernel"] == outputs["blocked"]


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86-64 Linux only"
)
def test_the_avx512_path_is_built_where_the_cpu_has_it():
    # -march=native: a build that silently left the vector path out would pass every other test.
    has_avx512 = " avx512f " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    assert cpu_attention.fast_for_prefill(16, 64) == has_avx512
