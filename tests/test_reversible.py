"""The reversible engine against plain autograd: gradients, RNG/autocast replay, memory, DDP."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from conftest import relative_error, tiny_config
from revformer import RevformerForCausalLM
from revformer.modeling_revformer import SublayerCoupling
from revformer.reversible import reversible_stack


def gradients(model: RevformerForCausalLM, ids: torch.Tensor, reversible: bool, seed: int = 0, autocast=None):
    """Loss, d(loss)/d(inputs_embeds) and every parameter's gradient for one step through the chosen path."""
    model.config.reversible = reversible
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return loss.detach(), embeds.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradients(model, ids, tolerance, **kwargs):
    loss_rev, embed_rev, grads_rev = gradients(model, ids, reversible=True, **kwargs)
    loss_plain, embed_plain, grads_plain = gradients(model, ids, reversible=False, **kwargs)
    assert torch.allclose(loss_rev, loss_plain, rtol=tolerance)
    assert relative_error(embed_rev, embed_plain) <= tolerance
    assert grads_rev.keys() == grads_plain.keys()
    errors = {name: relative_error(grads_rev[name], grads_plain[name]) for name in grads_plain}
    assert max(errors.values()) <= tolerance, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    return errors


def test_gradients_match_plain_autograd_12_layers_fp32():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=12)).train()
    ids = torch.randint(0, 128, (2, 48))
    assert_same_gradients(model, ids, tolerance=1e-5)


def test_gradients_match_with_dropout():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=12, attention_dropout=0.1, hidden_dropout=0.1)).train()
    ids = torch.randint(0, 128, (2, 48))
    assert_same_gradients(model, ids, tolerance=1e-5)
    # Dropout is really active: two passes with different seeds give different losses.
    assert not torch.equal(gradients(model, ids, True, seed=1)[0], gradients(model, ids, True, seed=2)[0])


def test_backward_leaves_callers_rng_stream_untouched():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=4, hidden_dropout=0.2)).train()
    ids = torch.randint(0, 128, (2, 32))
    after = {}
    for reversible in (True, False):
        gradients(model, ids, reversible, seed=123)
        after[reversible] = torch.rand(16)
    assert torch.equal(after[True], after[False])


def test_bf16_autocast_step_agrees_with_plain_path():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=6)).train()
    ids = torch.randint(0, 128, (2, 32))
    loss, _, grads = gradients(model, ids, reversible=True, autocast=torch.bfloat16)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    # bf16 has an 8-bit mantissa: agreement to a few percent is what both paths can promise each other.
    assert_same_gradients(model, ids, tolerance=5e-2, autocast=torch.bfloat16)


class ToyBlock(nn.Module):
    """A minimal block for the engine alone: no transformers, no attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.g = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.calls = {"f": 0, "g": 0}
        self.f.register_forward_hook(lambda *_: self.calls.__setitem__("f", self.calls["f"] + 1))
        self.g.register_forward_hook(lambda *_: self.calls.__setitem__("g", self.calls["g"] + 1))


def test_engine_reruns_each_sublayer_exactly_once_in_backward():
    torch.manual_seed(0)
    blocks = nn.ModuleList(ToyBlock(8) for _ in range(5)).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    y1, y2 = reversible_stack(x, x, blocks, capture_rng=False)
    ((y1 * y2).sum()).backward()
    assert all(block.calls == {"f": 2, "g": 2} for block in blocks)  # one forward + one re-run, never two
    rev_grads = [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]

    blocks.zero_grad(set_to_none=True)
    x.grad = None
    x1 = x2 = x
    for block in blocks:  # y1 = x1 + F(x2); y2 = x2 + G(y1)
        x1 = x1 + block.f(x2)
        x2 = x2 + block.g(x1)
    ((x1 * x2).sum()).backward()
    plain_grads = [p.grad for p in blocks.parameters()] + [x.grad]
    for a, b in zip(rev_grads, plain_grads):
        assert relative_error(a, b) < 1e-12


def activation_peak_mib(num_layers: int, reversible: bool) -> float:
    """Peak tensor memory of one training step minus parameter and gradient bytes, measured by MemTracker."""
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=num_layers, reversible=reversible)).train()
    ids = torch.randint(0, 128, (2, 256))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(ids, labels=ids).loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (peak - 2 * weights) / 2**20


def test_activation_memory_is_flat_in_depth_only_when_reversible():
    rev = {n: activation_peak_mib(n, True) for n in (2, 12, 24)}
    plain = {n: activation_peak_mib(n, False) for n in (2, 12, 24)}
    assert max(rev.values()) <= 1.05 * min(rev.values()), rev
    # The plain path stores every layer's activations: about linear growth, 12 -> 24 adds ~1.2x what 2 -> 12 added.
    assert plain[24] > 5 * plain[2], plain
    assert 1.0 < (plain[24] - plain[12]) / (plain[12] - plain[2]) < 1.4, plain
    assert rev[24] < plain[24] / 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("find_unused_parameters", [False, True])
def test_ddp_accepts_the_reversible_stack(single_process_group, find_unused_parameters):
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=3)).train()
    ids = torch.randint(0, 128, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    for _ in range(2):  # "marked ready twice" would surface in the first or second backward
        model.zero_grad(set_to_none=True)
        ddp(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert relative_error(p.grad, reference[name]) < 1e-5, name


@pytest.mark.parametrize("stream_dtype, tolerance", [("fixed_point", 1e-6), ("float32", 1e-4)])
def test_bdia_gradients_match_plain_autograd(stream_dtype, tolerance):
    """The scaled join `p[l+1] = gamma p[l-1] + out`: gamma is drawn per sequence inside the layer and redrawn
    identically by the re-run (replayed RNG); an odd layer count, every kernel, dropout and the converted options."""
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=5, coupling="bdia", stream_dtype=stream_dtype, bdia_gamma=0.25,
                         attention_layers=["full", "local", "lsh", "full", "local"], local_chunk_length=4,
                         lsh_chunk_length=4, lsh_num_buckets=4, hidden_dropout=0.1, num_key_value_heads=2,
                         qk_norm=True, qkv_bias=True, chunk_size_feed_forward=5)
    model = RevformerForCausalLM(config).train()
    ids = torch.randint(0, 128, (3, 17))
    assert_same_gradients(model, ids, tolerance)
    # gamma really is drawn: another seed gives another loss.
    loss_a = gradients(model, ids, reversible=True, seed=0)[0]
    loss_b = gradients(model, ids, reversible=True, seed=5)[0]
    assert not torch.allclose(loss_a, loss_b)


class LearnedMix(nn.Module, SublayerCoupling):
    """A topology variant with parameters: the hidden state `w1 * y1 + w2 * y2` of the top streams."""

    def __init__(self, hidden_size: int, w1: float, w2: float) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.full((hidden_size,), w1))
        self.weight2 = nn.Parameter(torch.full((hidden_size,), w2))

    def output(self, x1, x2):
        return self.weight1 * x1 + self.weight2 * x2


class EmbedOne(SublayerCoupling):
    """A topology variant of the first streams: the embedding feeds the second stream only."""

    def inputs(self, x):
        return torch.zeros_like(x), x


@pytest.mark.parametrize("variant", ["default", "learned_mix", "embed_one"])
@pytest.mark.parametrize("stream_dtype", ["float32", "fixed_point"])
def test_coupling_variants_match_plain_autograd(variant, stream_dtype):
    """`coupling=` replaces the topology the config names: the engine and the plain path both follow it, and a
    topology's own parameters train with the model."""
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=5, stream_dtype=stream_dtype)
    coupling = {"default": None, "learned_mix": LearnedMix(config.hidden_size, 0.3, -0.8), "embed_one": EmbedOne()}
    model = RevformerForCausalLM(config, coupling=coupling[variant]).train()
    assert (variant == "learned_mix") == ("model.coupling.weight1" in dict(model.named_parameters()))
    ids = torch.randint(0, 128, (2, 24))
    errors = assert_same_gradients(model, ids, tolerance=1e-5)
    assert ("model.coupling.weight1" in errors) == (variant == "learned_mix")


def test_hidden_states_are_the_topology_output_after_every_layer():
    """The default hidden state is the newest stream: a mix weighted (0, 1) gives the same hidden states after every
    layer, (1, 0) the other stream, which differs."""
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3)
    models = {"newest": RevformerForCausalLM(config).eval(),
              "mix01": RevformerForCausalLM(config, coupling=LearnedMix(config.hidden_size, 0.0, 1.0)).eval(),
              "mix10": RevformerForCausalLM(config, coupling=LearnedMix(config.hidden_size, 1.0, 0.0)).eval()}
    for model in models.values():
        model.load_state_dict(models["newest"].state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        hidden = {name: torch.stack(m(ids, output_hidden_states=True).hidden_states) for name, m in models.items()}
    assert hidden["newest"].shape[0] == 1 + config.num_hidden_layers
    torch.testing.assert_close(hidden["mix01"], hidden["newest"])
    assert relative_error(hidden["mix10"][1:], hidden["newest"][1:]) > 1e-2  # the streams differ


def test_a_rerun_output_is_freed_before_backward_only_when_nothing_saved_it():
    """The engine frees a re-run sublayer's output once the stream is rebuilt from it, unless autograd saved it for
    the backward (tanh keeps its output): the gradients above prove the saved case intact."""
    from revformer.reversible import SavedStorages

    x = torch.randn(4, 8, requires_grad=True)
    linear = nn.Linear(8, 8)
    with SavedStorages() as saved:
        kept, free = torch.tanh(linear(x)), linear(x) * 2.0
    saved.release_unless_saved(kept)
    saved.release_unless_saved(free)
    assert kept.untyped_storage().nbytes() > 0 and free.untyped_storage().nbytes() == 0
    grad = torch.ones(4, 8)
    (expected,) = torch.autograd.grad(torch.tanh(linear(x)) + linear(x) * 2.0, x, grad)
    assert torch.allclose(torch.autograd.grad((kept, free), x, (grad, grad))[0], expected)


class Shift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class PassThroughBlock(nn.Module):
    """F a linear layer, G adds a scalar: autograd hands G's output gradient back unchanged as its input gradient."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(width, width), Shift()


def test_gradients_the_engine_updates_in_place_are_its_own():
    """The engine updates dL/dy2 in place, in the copy its hook made of the arriving gradient: a gradient autograd
    hands back unchanged (G's input gradient here is dL/dy2 itself) is never overwritten."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(PassThroughBlock(8) for _ in range(3)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    _, y2 = reversible_stack(x, x, blocks, capture_rng=False)  # no gradient reaches y1: G's is dL/dy1
    arriving = torch.randn(2, 5, 8, dtype=torch.float64)
    kept = arriving.clone()
    y2.backward(arriving)
    assert torch.equal(arriving, kept)  # the caller's gradient is untouched
    rev_grads = [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]

    blocks.zero_grad(set_to_none=True)
    x.grad = None
    x1 = x2 = x
    for block in blocks:
        x1 = x1 + block.f(x2)
        x2 = x2 + block.g(x1)
    x2.backward(arriving)
    plain_grads = [p.grad for p in blocks.parameters()] + [x.grad]
    for a, b in zip(rev_grads, plain_grads):
        assert relative_error(a, b) < 1e-12
