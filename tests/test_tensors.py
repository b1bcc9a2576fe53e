"""The tensor codec (schemas.tensors.WireTensor): exactness, error bounds, rejections."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from schemas import WireTensor
from schemas.limits import MAX_TENSOR_ELEMENTS, MAX_TENSOR_NDIM
from schemas.tensors import MIN_SCALE

#: Runs with the edge extra alone (no torch, no redis): the board's Python 3.10 CI step too.
pytestmark = pytest.mark.edge

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest fp16 subnormal: the absolute resolution near 0

shapes = hnp.array_shapes(min_dims=1, max_dims=MAX_TENSOR_NDIM, min_side=1, max_side=6)


def f32_arrays(elements: st.SearchStrategy[float] | None = None, shape=shapes):
    if elements is None:
        elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float32, shape, elements=elements)


# --------------------------------------------------------------------------- round trips


@given(f32_arrays())
def test_float32_round_trips_exactly(x):
    t = WireTensor.from_array(x, "float32")
    assert t.dtype == "float32" and t.shape == x.shape and t.scale is None
    assert t.data == x.astype("<f4").tobytes()  # raw little-endian, nothing else
    y = t.to_array()
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)
    assert np.array_equal(np.signbit(y), np.signbit(x))  # even -0.0 survives


@given(f32_arrays(st.floats(-FP16_MAX, FP16_MAX, width=32)))
def test_float16_within_fp16_rounding(x):
    t = WireTensor.from_array(x, "float16")
    assert t.dtype == "float16" and len(t.data) == 2 * x.size
    y = t.to_array()
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(1e-3 * np.abs(x.astype(np.float64)), FP16_TINY)
    assert np.all(err <= bound), (x[err > bound], y[err > bound])


def _int8_bound_holds(x: np.ndarray) -> None:
    t = WireTensor.from_array(x, "int8")
    assert t.dtype == "int8" and t.shape == x.shape and len(t.data) == x.size
    vectors = x.size // x.shape[-1]
    assert t.scale is not None and len(t.scale) == 4 * vectors
    y = t.to_array()
    assert y.dtype == np.float32 and y.shape == x.shape
    x64 = x.astype(np.float64)
    amax = np.max(np.abs(x64), axis=-1, keepdims=True)
    # The scale is clamped to float32's smallest normal number: subnormal vectors
    # are then resolved to that step, not to max|x|/127.
    scale = np.maximum(amax / 127.0, MIN_SCALE)
    err = np.abs(y.astype(np.float64) - x64)
    # scale/2 per element; a relative 1e-5 for float32 arithmetic in the quantiser
    bound = scale * (0.5 + 1e-5)
    zero = (amax == 0).squeeze(-1)
    assert np.all(err[~zero] <= np.broadcast_to(bound, x.shape)[~zero])
    assert np.all(y[zero] == 0)
    q = np.frombuffer(t.data, np.int8)
    assert q.min(initial=0) >= -127  # symmetric: -128 never used


# |x| <= 2**119 (~6.6e35); values nearer float32's maximum: test_int8_near_float32_max
@given(f32_arrays(st.floats(-(2.0**119), 2.0**119, width=32, allow_subnormal=False)))
def test_int8_error_at_most_half_a_step_per_vector(x):
    _int8_bound_holds(x)


def test_int8_near_float32_max():
    x = np.array([np.finfo(np.float32).max, 1.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = WireTensor.from_array(x, "int8").to_array()
    assert np.all(np.isfinite(y))


def test_int8_scale_too_large_rejected_on_construction():
    with pytest.raises(ValidationError):
        WireTensor(dtype="int8", shape=(1, 2), data=b"\x7f\x00", scale=np.array([1e37], "<f4").tobytes())


@given(f32_arrays(st.floats(-2.0**-10, 2.0**-10, width=32, allow_subnormal=False), shape=st.just((3, 2, 16))))
def test_int8_small_activations(x):
    _int8_bound_holds(x)


def test_int8_scales_are_per_vector():
    """One outlier layer does not flatten the others."""
    x = np.stack([np.linspace(-1e-3, 1e-3, 8), np.linspace(-1e3, 1e3, 8)]).astype(np.float32)
    t = WireTensor.from_array(x, "int8")
    scales = np.frombuffer(t.scale, "<f4")
    np.testing.assert_allclose(scales, [1e-3 / 127, 1e3 / 127], rtol=1e-6)
    y = t.to_array()
    assert np.max(np.abs(y[0] - x[0])) <= 1e-3 / 127 / 2 * 1.0001
    np.testing.assert_array_equal(np.frombuffer(t.data, np.int8)[[0, 7, 8, 15]], [-127, 127, -127, 127])


def test_int8_tiny_subnormal_vector_encodes():
    x = np.array([[1e-44, 0.0, -1e-45], [1.0, 0.5, 0.0]], np.float32)
    _int8_bound_holds(x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3), (2, 3, 4), (1, 2, 1, 3)])
def test_zero_vectors(dtype, shape):
    x = np.zeros(shape, np.float32)
    t = WireTensor.from_array(x, dtype)
    y = t.to_array()
    np.testing.assert_array_equal(y, x)
    if dtype == "int8":
        assert np.all(np.frombuffer(t.scale, "<f4") > 0)  # a zero vector still has a usable scale


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_empty_leading_dimension(dtype):
    t = WireTensor.from_array(np.zeros((0, 3), np.float32), dtype)
    assert t.shape == (0, 3) and t.data == b""
    assert t.to_array().shape == (0, 3)


def test_int8_empty_last_dimension():
    t = WireTensor.from_array(np.zeros((3, 0), np.float32), "int8")
    assert t.to_array().shape == (3, 0)


def test_int8_empty_last_dimension_needs_its_scales():
    with pytest.raises(ValidationError, match="needs 3 scales"):
        WireTensor(dtype="int8", shape=(3, 0), data=b"", scale=b"")


def test_to_array_is_fresh_and_writable():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for dtype in ("float32", "float16", "int8"):
        t = WireTensor.from_array(x, dtype)
        y = t.to_array()
        y[...] = -1
        assert not np.array_equal(t.to_array(), y)


def test_big_endian_and_float64_inputs_are_converted():
    x = np.array([[1.5, -2.25, 3.0]], dtype=">f4")
    assert WireTensor.from_array(x).data == np.array([[1.5, -2.25, 3.0]], "<f4").tobytes()
    assert WireTensor.from_array(x.astype(np.float64)).to_array().tolist() == [[1.5, -2.25, 3.0]]
    assert WireTensor.from_array([[1, 2], [3, 4]]).shape == (2, 2)


def test_nbytes_and_repr():
    t = WireTensor.from_array(np.ones((4, 8), np.float32), "int8")
    assert t.nbytes == 32 + 16
    assert repr(t) == "WireTensor(dtype='int8', shape=[4, 8])"
    assert WireTensor.from_array(np.ones((4, 8)), "float16").nbytes == 64


def test_frozen():
    t = WireTensor.from_array(np.ones(3))
    with pytest.raises(ValidationError):
        t.dtype = "float16"  # type: ignore[misc]


# --------------------------------------------------------------------------- rejected on encode


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_rejected_on_encode(dtype, bad):
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="cannot encode NaN or infinite values"):
        WireTensor.from_array(x, dtype)


@given(f32_arrays(), st.data())
@settings(max_examples=50)
def test_any_nan_anywhere_rejected(x, data):
    i = data.draw(st.integers(0, x.size - 1))
    x = x.copy()
    x.flat[i] = np.nan
    with pytest.raises(ValueError):
        WireTensor.from_array(x, data.draw(st.sampled_from(["float32", "float16", "int8"])))


def test_float16_overflow_rejected_with_value_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="exceed the float16 range"):
            WireTensor.from_array(np.array([1.0, 7e4]), "float16")
        with pytest.raises(ValueError, match="NaN or infinite"):
            WireTensor.from_array(np.array([1e39]), "float32")  # beyond float32 from float64


def test_float16_overflow_rejected_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="exceed the float16 range"):
            WireTensor.from_array(np.array([1.0, 7e4]), "float16")


def test_float16_values_at_the_edge_of_the_range_are_kept():
    t = WireTensor.from_array(np.array([FP16_MAX, -FP16_MAX, 65519.0], np.float32), "float16")
    assert t.to_array().tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX]


def test_int8_needs_a_dimension():
    with pytest.raises(ValueError):
        WireTensor.from_array(np.float32(3.0), "int8")


# --------------------------------------------------------------------------- rejected on construction


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float16", 2)])
@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_float_byte_length_must_match_shape(dtype, itemsize, delta):
    n = 6 * itemsize + delta
    with pytest.raises(ValidationError, match=rf"{dtype} tensor of shape \[2, 3\] needs {6 * itemsize} bytes, got {n}"):
        WireTensor(dtype=dtype, shape=(2, 3), data=b"\0" * n)


def test_int8_byte_length_must_match_shape():
    with pytest.raises(ValidationError, match=r"needs 6 bytes, got 5"):
        WireTensor(dtype="int8", shape=(2, 3), data=b"\0" * 5, scale=np.ones(2, "<f4").tobytes())


def test_int8_needs_scales():
    with pytest.raises(ValidationError, match="needs its per-vector scales"):
        WireTensor(dtype="int8", shape=(2, 3), data=b"\0" * 6)


@pytest.mark.parametrize("n", [0, 1, 3, 6])
def test_int8_needs_one_scale_per_vector(n):
    with pytest.raises(ValidationError, match=rf"needs 2 scales, got {n}"):
        WireTensor(dtype="int8", shape=(2, 3), data=b"\0" * 6, scale=np.ones(n, "<f4").tobytes())


def test_int8_scale_bytes_not_a_multiple_of_four():
    with pytest.raises(ValidationError, match="needs 2 scales, got 1.75"):
        WireTensor(dtype="int8", shape=(2, 3), data=b"\0" * 6, scale=b"\0" * 7)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -0.0])
def test_int8_scales_must_be_finite_and_positive(bad):
    with pytest.raises(ValidationError, match="scales must be finite and positive"):
        WireTensor(dtype="int8", shape=(2, 3), data=b"\0" * 6, scale=np.array([1.0, bad], "<f4").tobytes())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_tensors_carry_no_scales(dtype):
    with pytest.raises(ValidationError, match=f"a {dtype} tensor carries no scales"):
        WireTensor(dtype=dtype, shape=(1,), data=b"\0" * (4 if dtype == "float32" else 2), scale=b"\0\0\x80?")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_bytes_rejected_on_construction(dtype, bad):
    data = np.array([1.0, bad], dtype="<f4" if dtype == "float32" else "<f2").tobytes()
    with pytest.raises(ValidationError, match="NaN or infinite"):
        WireTensor(dtype=dtype, shape=(2,), data=data)


@pytest.mark.parametrize("shape,match", [
    ((), "1 to 4 dimensions, not 0"),
    ((1, 1, 1, 1, 1), "1 to 4 dimensions, not 5"),
    ((-1, 2), "negative dimension"),
    ((MAX_TENSOR_ELEMENTS + 1,), "exceeds"),
    ((2**40, 2**40), "exceeds"),
])
def test_bad_shapes(shape, match):
    with pytest.raises(ValidationError, match=match):
        WireTensor(dtype="float32", shape=shape, data=b"")


def test_max_elements_is_allowed():
    t = WireTensor(dtype="int8", shape=(MAX_TENSOR_ELEMENTS // 1024, 1024), data=bytes(MAX_TENSOR_ELEMENTS),
                   scale=np.ones(MAX_TENSOR_ELEMENTS // 1024, "<f4").tobytes())
    assert t.shape[0] * t.shape[1] == MAX_TENSOR_ELEMENTS


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float64", "shape": (1,), "data": b"\0" * 8}, "dtype"),
    ({"dtype": "bfloat16", "shape": (1,), "data": b"\0" * 2}, "dtype"),
    ({"dtype": "float32", "shape": [1], "data": b"\0" * 4}, "shape"),  # strict: a tuple, not a list
    ({"dtype": "float32", "shape": (1,), "data": "\0" * 4}, "data"),  # strict: bytes, not str
    ({"dtype": "float32", "shape": (1.0,), "data": b"\0" * 4}, "shape"),
    ({"dtype": "float32", "shape": (True,), "data": b"\0" * 4}, "shape"),
    ({"dtype": "float32", "shape": (1,), "data": b"\0" * 4, "extra": 1}, "extra"),
])
def test_strict_types(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        WireTensor(**kwargs)


def test_validation_errors_are_value_errors():
    assert issubclass(ValidationError, ValueError)
