"""Fixed-point residual streams: bit-exact reconstruction at any depth, reversible gradients equal to plain backprop."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, tiny_config
from revformer import RevformerForCausalLM
from revformer.reversible import FixedPointArithmetic, StreamArithmetic, stream_arithmetic, pack_residue, unpack_residue

BF16 = torch.bfloat16


def build(num_layers: int, weight_scale: float = 1.0, seed: int = 0, **overrides) -> RevformerForCausalLM:
    """A tiny model whose block weights are scaled up, as training grows them (that is what amplifies float error)."""
    torch.manual_seed(seed)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=num_layers, **overrides)).train()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
    return model


def gradients(model: RevformerForCausalLM, ids: torch.Tensor, reversible: bool, autocast: bool = True):
    """Loss and every parameter's gradient (as float64) for one step through the chosen path."""
    model.config.reversible = reversible
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def max_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(relative_error(grads[name], reference[name]) for name in reference)


class Float64Arithmetic(StreamArithmetic):
    """float64 streams: with an fp64 model, the reference every low-precision variant is compared against."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_config_selects_fixed_point_and_encode_lands_on_the_grid():
    model = RevformerForCausalLM(tiny_config(stream_dtype="fixed_point", stream_fraction_bits=20))
    streams = model.model.streams
    assert isinstance(streams, FixedPointArithmetic) and streams.limit == 2.0**33
    x = torch.randn(64, dtype=torch.float32, requires_grad=True)
    stream = streams.encode(x)
    assert stream.dtype == torch.float64
    assert torch.equal(stream * 2**20, (stream * 2**20).round())  # integer multiples of 2^-20
    assert (stream - x.double()).abs().max() <= 2.0**-21  # round to nearest
    stream.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


@pytest.mark.parametrize("num_layers", [12, 48, 96])
def test_reconstruction_is_exact_with_fixed_point_streams_only(num_layers):
    model = build(num_layers, weight_scale=3.0, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    ids = torch.randint(0, 128, (1, 16))
    errors = {}
    for stream_dtype in ("fixed_point", "float32"):
        model.model.streams = stream_arithmetic(stream_dtype)
        with torch.autocast("cpu", dtype=BF16):
            errors[stream_dtype] = model.model.reconstruction_error(ids)
    assert errors["fixed_point"] == 0.0, errors
    assert errors["float32"] > 0.0, errors  # the check can fail: float streams do not invert exactly


def test_reconstruction_replays_dropout_and_leaves_callers_rng_alone():
    model = build(6, hidden_dropout=0.2, attention_dropout=0.2, stream_dtype="fixed_point")
    ids = torch.randint(0, 128, (2, 16))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=BF16):
        assert model.model.reconstruction_error(ids) == 0.0
    after = torch.rand(8)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(8), after)


def test_reversible_gradients_equal_plain_path_and_beat_float32_streams():
    # 24 layers, bf16 compute, weights x3: float32 streams rebuild inputs with a visible error, fixed point exactly.
    model = build(24, weight_scale=3.0, hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, 128, (2, 32))
    reference = build(24, weight_scale=3.0, hidden_size=64, intermediate_size=128).double()
    reference.model.streams = Float64Arithmetic()
    _, ref_grads = gradients(reference, ids, reversible=False, autocast=False)

    results = {}
    for stream_dtype in ("fixed_point", "float32"):
        model.model.streams = stream_arithmetic(stream_dtype)
        rev_loss, rev = gradients(model, ids, reversible=True)
        plain_loss, plain = gradients(model, ids, reversible=False)
        results[stream_dtype] = dict(
            loss_gap=(rev_loss - plain_loss).abs().item(),
            vs_plain=max_error(rev, plain),
            vs_fp64=max_error(rev, ref_grads),
            plain_vs_fp64=max_error(plain, ref_grads),
        )
    fixed, float32 = results["fixed_point"], results["float32"]
    # Same streams, same rounding: the paths may differ only by float rounding of the gradient sums (and by
    # kernels that pick another algorithm with grad enabled); on CPU they are bit-identical.
    assert fixed["loss_gap"] <= 1e-6 and fixed["vs_plain"] <= 1e-6, results
    assert fixed["vs_fp64"] <= 1.01 * fixed["plain_vs_fp64"], results  # as close to fp64 as plain backprop
    assert float32["vs_plain"] > 1e-2, results
    assert float32["vs_fp64"] > 3 * fixed["vs_fp64"], results


def test_training_with_fixed_point_streams_lowers_the_loss_like_float_streams():
    ids = torch.randint(3, 128, (2, 16))
    losses = {}
    for stream_dtype in ("fixed_point", "float32"):
        model = build(2, stream_dtype=stream_dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = []
        for _ in range(25):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=BF16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses[stream_dtype] = history
    for history in losses.values():
        assert history[-1] < 0.5 * history[0], losses
    assert abs(losses["fixed_point"][-1] - losses["float32"][-1]) < 0.1 * losses["float32"][0], losses


def test_out_of_range_stream_names_value_limit_and_fix():
    # 40 fraction bits leave a limit of 2^13 = 8192, which weights x300 push the streams past.
    model = build(2, weight_scale=300.0, stream_dtype="fixed_point", stream_fraction_bits=40)
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(OverflowError, match=r"max \|stream\| = [0-9.e+]+ reached the limit 8192 = 2\^13") as info:
        model(ids, labels=ids).loss.backward()
    assert "fewer stream_fraction_bits" in str(info.value)
    with pytest.raises(OverflowError, match="stream_fraction_bits=40"):
        model.model.reconstruction_error(ids)


def test_non_finite_sublayer_output_is_reported():
    model = build(2, stream_dtype="fixed_point")
    with torch.no_grad():
        model.model.layers[1].feed_forward.down_proj.weight[0, 0] = float("nan")
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(FloatingPointError, match="non-finite"):
        model(ids, labels=ids).loss.backward()


def test_gradient_checkpointing_keeps_fixed_point_streams():
    model = build(2, stream_dtype="fixed_point", reversible=False)
    ids = torch.randint(0, 128, (2, 16))
    loss, grads = gradients(model, ids, reversible=False)
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed = gradients(model, ids, reversible=False)
    assert checkpointed_loss == loss
    assert max_error(checkpointed, grads) == 0.0


@pytest.mark.parametrize("keep_bits", [1, 3])
def test_a_scaled_join_inverts_bit_for_bit_and_keeps_only_its_residue(keep_bits):
    """`y = keep * x + out` with keep = +-2^-m per sequence (the bdia coupling): unjoin rebuilds x exactly, from y,
    out, keep and m packed bits per element; without the residue the inverse is off by up to 2^(m-1) grid steps."""
    arithmetic = FixedPointArithmetic(32, keep_bits)
    torch.manual_seed(0)
    x = torch.randint(-(10**12), 10**12, (3, 7, 5)).double() * 2.0**-32  # any grid points, odd ones too
    out = torch.randn(3, 7, 5)
    keep = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1) * 2.0**-keep_bits
    y, residue = arithmetic.join(x, out, keep)
    assert torch.equal(arithmetic.unjoin(y, out, keep, residue), x)
    assert residue.planes.dtype == torch.uint8 and residue.planes.numel() == keep_bits * -(-x.numel() // 8)
    lossy = arithmetic.subtract(y, out) / keep.double()  # the inverse without the residue
    assert (lossy - x).abs().max() > 0
    # The packed residue round-trips (105 elements: not a multiple of 8).
    values = torch.randint(0, 2**keep_bits, (3, 7, 5)).double()
    assert torch.equal(unpack_residue(pack_residue(values, keep_bits)).double(), values)


def test_bdia_reconstruction_is_exact_with_fixed_point_streams_only():
    """The bdia inverse divides by gamma once per layer: float streams double their rounding error each layer,
    fixed-point streams with the kept residue rebuild the input exactly at any depth."""
    model = build(24, weight_scale=2.0, coupling="bdia", hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  stream_dtype="fixed_point")
    ids = torch.randint(0, 128, (2, 16))
    errors = {}
    for stream_dtype in ("fixed_point", "float32"):
        model.model.streams = stream_arithmetic(stream_dtype)
        errors[stream_dtype] = model.model.reconstruction_error(ids)
    assert errors["fixed_point"] == 0.0 and errors["float32"] > 1e-4, errors
    with pytest.raises(ValueError, match="only in train mode"):
        model.eval().model.reconstruction_error(ids)


@pytest.mark.parametrize("fraction_bits", [8, 24, 32, 52])
def test_a_parked_stream_is_its_fp32_read_and_an_int32_correction(fraction_bits):
    """While a sublayer re-runs, the stream it read is parked: its memory is freed and it is rebuilt, bit for bit,
    from the fp32 copy the sublayer reads and an int32 count of grid steps, up to the stream limit."""
    arithmetic = FixedPointArithmetic(fraction_bits)
    torch.manual_seed(0)
    limit_steps = 2.0 ** 53 - 1  # the largest stream, in grid steps
    steps = torch.cat([torch.randint(-(2**62), 2**62, (2, 40, 3)).double().clamp(-limit_steps, limit_steps),
                       torch.randint(-1000, 1000, (2, 40, 3)).double()], dim=2)  # large and tiny values
    stream = steps * 2.0**-fraction_bits
    stream[0, 0, 0] = (2.0**53 - 1) * 2.0**-fraction_bits  # the limit itself, where the fp32 rounding is coarsest
    original, read = stream.clone(), arithmetic.read(stream)
    parked = arithmetic.park(stream, read)
    assert stream.untyped_storage().nbytes() == 0 and parked[0].dtype == torch.int32
    arithmetic.unpark(stream, read, parked)
    assert torch.equal(stream, original)
    # Float streams are read as they are: nothing to park.
    assert StreamArithmetic().park(original, original) is None


class RecordingArithmetic(FixedPointArithmetic):
    """Fixed-point streams that keep a copy of every stream the engine's forward joins an output to, and of every
    stream its backward rebuilds."""

    def __init__(self, keep_bits: int) -> None:
        super().__init__(32, keep_bits)
        self.joined: list[torch.Tensor] = []
        self.rebuilt: list[torch.Tensor] = []

    def join(self, stream, out, keep=None, invertible=True, inplace=False):
        self.joined.append(stream.clone())
        return super().join(stream, out, keep, invertible, inplace)

    def unjoin(self, y, out, keep=None, residue=None, inplace=False):
        stream = super().unjoin(y, out, keep, residue, inplace)
        self.rebuilt.append(stream.clone())  # a copy: the engine rebuilds the next stream over this one
        return stream


@pytest.mark.parametrize("coupling, chunk, dropout, autocast", [
    ("bdia", 8, 0.0, False), ("bdia", 8, 0.1, True), ("bdia", 0, 0.0, True), ("sublayer", 8, 0.1, True),
    ("sublayer", 8, 0.0, False), ("bdia", 8, 0.0, True),
])
def test_backward_rebuilds_every_stream_bit_for_bit(coupling, chunk, dropout, autocast):
    """Inside the engine's backward, each re-run reproduces its forward output bit for bit (chunked feed-forward and
    attention, dropout, bf16 autocast), so every stream it rebuilds equals the one the forward joined, exactly."""
    model = build(5, coupling=coupling, stream_dtype="fixed_point", chunk_size_feed_forward=chunk,
                  chunk_size_attention=chunk and chunk - 3, hidden_dropout=dropout, attention_dropout=dropout)
    arithmetic = RecordingArithmetic(model.config.bdia_keep_bits or 1)
    model.model.streams = arithmetic
    ids = torch.randint(0, 128, (2, 24))
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        model(ids, labels=ids).loss.backward()
    units = 5 if coupling == "sublayer" else 3  # bdia runs pairs of layers: a no-update partner, then 2 + 2
    assert len(arithmetic.joined) == len(arithmetic.rebuilt) == 2 * units
    for joined, rebuilt in zip(arithmetic.joined, reversed(arithmetic.rebuilt)):
        assert torch.equal(joined, rebuilt)
