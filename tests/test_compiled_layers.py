"""Overrides 10 and 11 (issue 13): decoder layers compiled as regions, and checkpointed layer inputs offloaded.

On the CPU the compiled layers run through torch.compile's "aot_eager" backend (dynamo's graph capture and the derived
backward pass, without inductor's code generation, which the GPU test in test_gpu_real_shapes.py covers). The
offloaded checkpoint keeps its stash as it is on the CPU; the recomputation, random state and autocast handling are
the same code as on a GPU.
"""
from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

import mlp_chunks
from fastpath import offload
from fastpath import choices
from cli.arguments import DataArguments, ModelArguments
from cli.errors import UserInputError
from fastpath import compiled_layers, lora_4bit
from conftest import quantized_lora_model, small_gemma


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (one per compilation) and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        # The whole layer in one graph: the 4-bit weights' dequantization (7 LoRA layers) and the attention in it.
        targets = [str(node.target) for node in graph_module.graph.nodes]
        assert sum("rshift" in t for t in targets) == 7, targets  # lora_4bit.dequantize_4bit_traced's high halves
        assert any("attention" in t for t in targets), targets
        return aot_eager(graph_module, example_inputs)


@pytest.fixture(autouse=True)
def compiler_as_in_a_run():
    """Each test compiles from an empty cache, under the compiler settings a run trains with (override 10)."""
    torch._dynamo.reset()
    with compiled_layers.compiler_settings():
        yield


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A tiny QLoRA model of six layers, one of them full attention, on the fused 4-bit path."""
    base = small_gemma(layers=6, layer_types=["sliding_attention", "full_attention"] + ["sliding_attention"] * 4)
    model = quantized_lora_model(tmp_path_factory.mktemp("four_layers"), dropout=0.1, base=base)
    assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True) == 6 * 7
    return model


def loss_and_grads(model, input_ids, seed=0, autocast=False):
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpointed(model, function=None, dropout=True):
    copied = copy.deepcopy(model).train()
    if not dropout:  # compiled graphs draw their dropout masks otherwise than eager code
        for module in copied.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    copied.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if function is not None:
        for layer in copied.base_model.model.model.layers:
            layer._gradient_checkpointing_func = function
    return copied


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert set(a[1]) == set(b[1])
    for name, grad in a[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(b[1][name], grad, rtol=rtol * 10, atol=atol, msg=name)


def batch(length, rows=2, seed=1):
    return torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_offloaded_checkpoint_gives_the_stock_checkpoints_loss_and_gradients(lora_model):
    """With LoRA dropout: the random state must be replayed in the recomputation."""
    ids = batch(24)
    stock = loss_and_grads(checkpointed(lora_model), ids)
    offloaded = loss_and_grads(checkpointed(lora_model, offload.checkpoint), ids)
    assert_same(stock, offloaded)
    assert offload._newest[torch.device("cpu")].host is None  # every stash went back


def test_offloaded_checkpoint_recomputes_under_the_forward_passes_autocast():
    """Full training (GaLore's case: every weight has a gradient) under bf16 autocast, which the backward pass,
    where the layer is run again, does not have on its own."""
    model = small_gemma(layers=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stock = loss_and_grads(model, batch(24), autocast=True)
    for layer in model.model.layers:
        layer._gradient_checkpointing_func = offload.checkpoint
    assert_same(stock, loss_and_grads(model, batch(24), autocast=True))


def test_compiled_layers_give_the_eager_answer_and_compile_once_per_kind(lora_model):
    eager = checkpointed(lora_model, dropout=False)
    compiled = checkpointed(lora_model, dropout=False)
    backend = CountingBackend()
    assert compiled_layers.compile_decoder_layers(compiled, backend=backend) == 6
    assert_same(loss_and_grads(eager, batch(20)), loss_and_grads(compiled, batch(20)))
    # Fewer graphs than layers: they share them, by kind (the first layer, whose input from frozen embeddings has no
    # grad; the full-attention layer; the other sliding-window layers).
    first = backend.graphs
    assert first == 3
    # Sizes are symbols: nothing is compiled again (except for a batch of one row: torch specializes sizes 0 and 1).
    for length, rows in ((24, 2), (31, 3), (40, 2)):
        ids = batch(length, rows, seed=length)
        assert_same(loss_and_grads(eager, ids), loss_and_grads(compiled, ids))
    assert backend.graphs == first
    with torch.no_grad():  # evaluation runs the stock layers
        compiled.eval()(input_ids=batch(12))
    assert backend.graphs == first


def test_compiled_layers_follow_flags_changed_mid_run():
    """peft's disable_adapter() (as a DPO reference pass uses) in training mode reaches the compiled graphs: torch's
    guards on module attributes must stay (a guard filter that dropped them was tried and failed this). A LoRA model
    without 4-bit layers: bitsandbytes' CPU layers switch kernels once nothing needs a gradient."""
    from peft import LoraConfig, get_peft_model

    model = small_gemma(layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    eager = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    compiled = copy.deepcopy(eager)
    assert compiled_layers.compile_decoder_layers(compiled, backend="aot_eager") == 3
    ids = batch(20)
    assert_same(loss_and_grads(eager, ids), loss_and_grads(compiled, ids))
    with eager.disable_adapter(), compiled.disable_adapter():
        without_adapters = eager(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, without_adapters)
    assert not torch.allclose(compiled(input_ids=ids, labels=ids).loss, without_adapters)


def test_compiled_and_offloaded_layers_together_give_the_eager_answer(lora_model):
    eager = checkpointed(lora_model, dropout=False)
    both = checkpointed(lora_model, offload.checkpoint_compiled, dropout=False)
    backend = CountingBackend()
    compiled_layers.compile_decoder_layers(both, backend=backend)
    assert_same(loss_and_grads(eager, batch(20)), loss_and_grads(both, batch(20)))
    first = backend.graphs
    # One graph per kind of layer (sliding window, full attention): the forward pass runs the training graph too, and
    # no frame is analysed twice (floats are constants: compiler_settings).
    assert first == 2
    for length in (24, 37):
        assert_same(loss_and_grads(eager, batch(length)), loss_and_grads(both, batch(length)))
    assert backend.graphs == first


def test_one_graph_serves_both_kinds_of_layer_with_each_ones_window_and_rotary_embeddings(lora_model):
    """Override 17 over compiled and offloaded layers, as a run installs them: one graph for the sliding-window and
    the full-attention layers, the eager answer on rows longer than the 16-token window; each layer's attributes as
    they were after every call; evaluation runs the stock layers; nothing left once restored."""
    from fastpath import one_layer_graph
    from fastpath.patches import Patches

    eager = checkpointed(lora_model, dropout=False)
    both = checkpointed(lora_model, offload.checkpoint_compiled, dropout=False)
    layers = compiled_layers.decoder_layers(both)
    kinds = [(layer.self_attn.is_sliding, layer.self_attn.sliding_window) for layer in layers]
    assert sorted(kinds, key=str) == [(False, None)] + [(True, 16)] * 5
    backend, patches = CountingBackend(), Patches()
    assert compiled_layers.compile_decoder_layers(both, backend=backend, patches=patches) == 6
    assert one_layer_graph.unify_layer_kinds(both, patches) == 6
    for length, rows in ((20, 2), (24, 2), (37, 3)):
        assert_same(loss_and_grads(eager, batch(length, rows)), loss_and_grads(both, batch(length, rows)))
        assert [(layer.self_attn.is_sliding, layer.self_attn.sliding_window) for layer in layers] == kinds
    assert backend.graphs == 1
    with torch.no_grad():
        both.eval()(input_ids=batch(12))
    assert backend.graphs == 1
    patches.restore()
    assert all("forward" not in vars(layer) for layer in layers)


def test_one_graph_sets_the_attributes_alike_during_a_call_and_puts_them_back_even_when_it_fails(monkeypatch):
    """Override 17 without a compiler: inside a training call every attention reads is_sliding True and no
    sliding_window; afterwards each layer has its own again, also after a call that raised."""
    from fastpath import one_layer_graph

    model = small_gemma(layers=6).train()
    layers = model.model.layers
    kinds = [(layer.self_attn.is_sliding, layer.self_attn.sliding_window) for layer in layers]
    assert kinds == [(True, 16)] * 5 + [(False, None)]
    assert one_layer_graph.unify_layer_kinds(model) == 6
    during = []
    for layer in layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args: during.append((module.is_sliding, module.sliding_window)))
    model(input_ids=batch(20))
    assert during == [(True, None)] * 6
    assert [(layer.self_attn.is_sliding, layer.self_attn.sliding_window) for layer in layers] == kinds

    def fails(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(layers[5].mlp, "forward", fails)
    with pytest.raises(RuntimeError, match="planted"):
        model(input_ids=batch(20))
    assert [(layer.self_attn.is_sliding, layer.self_attn.sliding_window) for layer in layers] == kinds


def test_the_switch_and_the_guard_say_why_there_is_no_one_graph(caplog):
    """`-one_layer_graph` logs "off", not a guard; a sliding layer without a number for its window is refused."""
    from types import SimpleNamespace

    from fastpath import one_layer_graph
    from fastpath.switchboard import FastPath

    model = small_gemma(layers=2).train()
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(n_gpu=1, world_size=1),
                              add_callback=lambda callback: None, remove_callback=lambda callback: None)
    with FastPath(frozenset({"compile_layers"}), speed=choices.SpeedChoices(True, False)).installed(trainer) as done:
        assert done["one_layer_graph"] == "off" and done["compile_layers"] == "2 layers"
    model.model.layers[0].self_attn.sliding_window = None
    with caplog.at_level(logging.INFO, logger="fastpath.one_layer_graph"):
        assert one_layer_graph.unify_layer_kinds(model) == 0
    assert "the sliding-window layers' windows are [16, None], not all numbers" in caplog.text


def test_one_graph_is_not_tried_where_the_attention_reads_the_window_itself(caplog):
    from fastpath import one_layer_graph

    model = small_gemma(layers=2)
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.INFO, logger="fastpath.one_layer_graph"):
        assert one_layer_graph.unify_layer_kinds(model) == 0
    assert "not with flash_attention_2 attention" in caplog.text
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_the_first_step_says_what_it_waits_for_and_how_long_it_took(lora_model, caplog, monkeypatch, tmp_path):
    """Issue 27: before the first step, that it compiles and whether torch's cache is empty; after it, the time and
    torch.compile's share by its own timers; nothing more at later steps."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = checkpointed(lora_model, dropout=False)
    compiled_layers.compile_decoder_layers(model, backend="aot_eager")
    wait = compiled_layers.CompileWait()
    before = compiled_layers.compile_seconds()
    with caplog.at_level(logging.INFO, logger="fastpath.compiled_layers"):
        for _ in range(2):
            wait.on_step_begin(None, None, None)
            loss_and_grads(model, batch(20))
            wait.on_step_end(None, None, None)
    assert compiled_layers.compile_seconds()["total"] > before["total"]
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2, said
    assert f"torch's compile cache {tmp_path} is empty" in said[0]
    step, compiled = map(int, re.match(r"First step: (\d+) s, of which torch.compile (\d+) s", said[1]).groups())
    assert compiled <= step

    (tmp_path / "fxgraph" / "ab").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastpath.compiled_layers"):
        compiled_layers.CompileWait().on_step_begin(None, None, None)
    assert "holds earlier compilations" in caplog.text


def test_the_compiled_graphs_saved_in_the_output_folder_spare_a_resumed_run_the_compile(tmp_path, monkeypatch, caplog):
    """Issue 27: after the first step the graphs go to OUTPUT/torch_compile_cache.bin (the main process alone); a
    run resumed there on a machine whose torch cache is empty (a fresh Colab session) reads them: inductor's graph
    cache hits. A file torch cannot read is said and skipped."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    def first_step(cache, should_save=True):
        torch._dynamo.reset()
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / cache))
        args = SimpleNamespace(output_dir=str(tmp_path / "run"), should_save=should_save)
        wait = compiled_layers.CompileWait()
        wait.on_step_begin(args, None, None)
        compiled = torch.compile(lambda x: (x.sin() * 3 + x.cos()).sum(), dynamic=True)
        compiled(torch.randn(8))
        wait.on_step_end(args, None, None)

    (tmp_path / "run").mkdir()
    saved = tmp_path / "run" / compiled_layers.SAVED_GRAPHS
    first_step("other_process", should_save=False)
    assert not saved.exists()
    with caplog.at_level(logging.INFO, logger="fastpath.compiled_layers"):
        first_step("first_session")
    assert saved.stat().st_size > 0 and f"The compiled graphs are saved in {saved}" in caplog.text
    counters.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastpath.compiled_layers"):
        first_step("fresh_session")
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
    assert f"with the graphs an earlier run saved in {saved} added" in caplog.text

    saved.write_bytes(b"not torch's")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastpath.compiled_layers"):
        first_step("another_fresh_session")
    assert f"The compiled graphs in {saved} were not read" in caplog.text


def test_the_switchboard_installs_the_wait_log_and_the_one_graph_checkpoint_and_takes_them_away():
    """All chosen: the first step's log and the offload callback (checkpoint_compiled) on the trainer while it trains,
    the layers' kinds under one graph; afterwards no callback, no compiled or wrapped forward and the Trainer's
    checkpointing function."""
    from types import SimpleNamespace

    from fastpath.switchboard import FastPath

    model = small_gemma(layers=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stock = [layer._gradient_checkpointing_func for layer in model.model.layers]
    callbacks = []
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(n_gpu=1, world_size=1),
                              add_callback=callbacks.append, remove_callback=callbacks.remove)
    fast = FastPath(frozenset({"compile_layers", "offload", "one_layer_graph"}), speed=choices.SpeedChoices(True, True))
    with fast.installed(trainer) as done:
        wait, offloading = callbacks
        assert isinstance(wait, compiled_layers.CompileWait) and "one graph for both kinds" in wait.graphs
        assert done["one_layer_graph"] == "on"
        offloading.on_train_begin(None, None, None, model=model)
        assert all(layer._gradient_checkpointing_func is offload.checkpoint_compiled for layer in model.model.layers)
        assert all("forward" in vars(layer) for layer in model.model.layers)
    assert callbacks == []
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == stock


def test_mlp_in_token_chunks_gives_the_same_answer_eager_compiled_and_offloaded(lora_model):
    """Override 14: each MLP sees its tokens in pieces, with the loss and gradients of the whole; compiled and
    offloaded, still one graph per kind of layer, whatever the token count."""
    eager = checkpointed(lora_model, dropout=False)
    chunked = checkpointed(lora_model, offload.checkpoint_compiled, dropout=False)
    assert mlp_chunks.chunk_mlp_tokens(chunked, 2) == 6
    seen = []
    gate = chunked.base_model.model.model.layers[1].mlp.gate_proj
    hook = gate.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[:-1].numel()))
    assert_same(loss_and_grads(eager, batch(21)), loss_and_grads(chunked, batch(21)))
    assert sorted(set(seen)) == [21]  # two rows of 21 tokens: 42 in two pieces
    seen.clear()
    assert_same(loss_and_grads(eager, batch(3, rows=1)), loss_and_grads(chunked, batch(3, rows=1)))
    hook.remove()
    assert set(seen) == {3}  # fewer tokens than two a piece: the stock forward, whole

    graphs = []

    def counting(graph_module, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        # The chunks are in the graph: gate, up and down called once a piece (one dequantization each, 7 unchunked).
        assert sum("rshift" in str(node.target) for node in graph_module.graph.nodes) == 10
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    compiled_layers.compile_decoder_layers(chunked, backend=counting)
    assert_same(loss_and_grads(eager, batch(20)), loss_and_grads(chunked, batch(20)))
    first = len(graphs)
    for length, rows in ((24, 2), (37, 3)):  # a batch of one row would compile again, chunked or not
        assert_same(loss_and_grads(eager, batch(length, rows)), loss_and_grads(chunked, batch(length, rows)))
    assert len(graphs) == first == 2


def test_offload_callback_installs_on_train_begin(lora_model, caplog):
    model = checkpointed(lora_model)
    with caplog.at_level(logging.INFO, logger="fastpath.offload"):
        offload.OffloadLayerInputs().on_train_begin(None, None, None, model=model)
    assert all(layer._gradient_checkpointing_func is offload.checkpoint for layer in model.base_model.model.model.layers)
    assert "Checkpointed inputs of 6 decoder layers go to pinned CPU memory." in caplog.text


# ---------------------------------------------------------------------------
# What 'auto' means
# ---------------------------------------------------------------------------


class Training:
    def __init__(self, world_size=1, gradient_checkpointing=True, torch_compile=False):
        self.use_cpu, self.device, self.world_size = False, torch.device("cuda:0"), world_size
        self.gradient_checkpointing, self.torch_compile = gradient_checkpointing, torch_compile


def choose(monkeypatch, capability=(9, 0), gpu=True, packed=True, dropout=0.0, triton=True, flags=None, **training):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(choices.importlib.util, "find_spec", lambda name: object() if triton else None)
    data = DataArguments(max_tokens_per_batch=8192 if packed else None, padding_free=packed)
    return choices.choose(ModelArguments(**(flags or {})), data, Training(**training), dropout)


def test_auto_compiles_packed_batches_on_ampere_or_newer_and_says_why_not_elsewhere(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="fastpath.choices"):
        assert choose(monkeypatch).compile_layers
        assert "Decoder layers compiled (auto: packed batches, compute capability 9.0)" in caplog.text
        assert not choose(monkeypatch, capability=(7, 5)).compile_layers
        assert "eager (auto: compute capability 7.5, under 8.0)" in caplog.text
        assert not choose(monkeypatch, packed=False).compile_layers
        assert not choose(monkeypatch, gpu=False).compile_layers
        assert not choose(monkeypatch, world_size=2).compile_layers
        assert "eager (auto: several processes, not measured yet)" in caplog.text
        assert not choose(monkeypatch, torch_compile=True).compile_layers


def test_auto_offloads_only_where_the_reentrant_scheme_is_safe(monkeypatch):
    assert choose(monkeypatch).offload_activations
    assert not choose(monkeypatch, world_size=2).offload_activations
    assert not choose(monkeypatch, gradient_checkpointing=False).offload_activations
    assert not choose(monkeypatch, dropout=0.05).offload_activations  # compiled: its two graphs draw differently
    assert not choose(monkeypatch, packed=False).offload_activations  # new shapes would each hold pinned memory
    assert choose(monkeypatch, capability=(7, 5), dropout=0.05).offload_activations  # eager layers replay dropout


def test_flags_stand_over_auto_and_compiling_without_triton_is_refused(monkeypatch):
    assert choose(monkeypatch, flags=dict(compile_layers="no", offload_activations="no")) == choices.SpeedChoices(
        False, False)
    assert choose(monkeypatch, gpu=False, flags=dict(compile_layers="yes", offload_activations="yes")) == (
        choices.SpeedChoices(True, True))
    assert not choose(monkeypatch, triton=False).compile_layers
    with pytest.raises(UserInputError, match="no triton"):
        choose(monkeypatch, triton=False, flags=dict(compile_layers="yes"))


def test_a_layer_the_compiler_fails_on_runs_eagerly(lora_model):
    """A compiler that fails on this machine costs speed, not the run (override 10's fallback)."""
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("a compiler that does not work here")

    eager = checkpointed(lora_model, dropout=False)
    broken = checkpointed(lora_model, dropout=False)
    compiled_layers.compile_decoder_layers(broken, backend=failing_backend)
    assert_same(loss_and_grads(eager, batch(20)), loss_and_grads(broken, batch(20)))


def test_the_flash_path_takes_the_window_as_a_symbol_so_both_kinds_share_a_graph(monkeypatch):
    """Override 17 on a GPU's path, traced on meta tensors (the kernel forecast forced): the flash call gets the
    window - 1 from the graph's inputs, so a sliding window and FULL_WINDOW, at any row length, make one graph."""
    from fastpath import one_layer_graph, varlen_attention

    monkeypatch.setattr(varlen_attention, "flash_kernel", lambda device, head_dim: True)
    monkeypatch.setattr(varlen_attention, "serves", lambda *args: True)
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def attention(query, key, value, bounds, window):
        return varlen_attention.attention(query, key, value, 0.0, 0.0625, window,
                                          {"cu_seq_lens_q": bounds, "max_length_q": 8}, always_window=True)

    compiled = torch.compile(attention, backend=counting, dynamic=True)
    for length, window in ((64, 16), (64, one_layer_graph.FULL_WINDOW), (96, 16), (96, one_layer_graph.FULL_WINDOW)):
        query = torch.empty(1, 4, length, 32, device="meta", dtype=torch.bfloat16)
        key = torch.empty(1, 1, length, 32, device="meta", dtype=torch.bfloat16)
        bounds = torch.tensor([0, length // 2, length], device="meta", dtype=torch.int32)
        assert compiled(query, key, key, bounds, window).shape == (1, length, 4, 32)
    (graph,) = graphs
    (flash,) = [node for node in graph.graph.nodes if "flash_attention" in str(node.target)]
    assert isinstance(flash.kwargs["window_size_left"], torch.fx.Node)  # window - 1, computed in the graph
    assert flash.kwargs["window_size_right"] == 0
