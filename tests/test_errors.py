"""Bad input gets a clear error before the language model does any work."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import PRUNING, examples, greedy, inputs, model_and_processor
from PIL import Image
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM

import mmtoken
from mmtoken.methods import METHODS


@pytest.fixture
def llava():
    model, _ = model_and_processor("llava")
    yield model
    if hasattr(model, "_mmtoken_handle"):
        mmtoken.unpatch(model)


@pytest.fixture
def layer_calls(llava):
    calls = []
    handle = llava.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    ("method", "params", "error", "message"),
    [
        ("fastvv", {}, KeyError, "unknown method 'fastvv'; known: aim, atp, bilevel, divprune, fastv"),
        ("fastv", {"keep_ratio": 0.5}, TypeError, "unknown parameter(s) keep_ratio"),
        ("fastv", {"ratio": 0.0}, ValueError, "ratio must be in (0, 1]"),
        ("pdrop", {"layers": (2, 4), "ratio": 1.5}, ValueError, "ratio must be in (0, 1]"),
        ("fastv", {"k": 6}, ValueError, "fastv: layer 6 is past the model's 6 decoder layers"),
        ("pdrop", {"layers": (2, 9)}, ValueError, "layer 9 is past the model's 6 decoder layers"),
        ("pdrop", {"layers": (4, 2)}, ValueError, "layers must be increasing"),
        ("random", {"layer": 7}, ValueError, "layer 7 is past"),
        ("fastv", {"budget": -5}, ValueError, "budget must be a positive number"),
        ("uniform", {"keep": -1}, ValueError, "keep must be >= 0"),
        ("fastv", {"ratio": 0.5, "keep": 3}, ValueError, "give one of keep, ratio, budget"),
        ("fastv", {"k": 0}, ValueError, "k must be >= 1"),
        ("pooling", {"stride": 0}, ValueError, "stride must be >= 1"),
        ("visionzip", {"contextual": 1.5}, ValueError, "visionzip: contextual must be a share in [0, 1]"),
        ("divprune", {"ratio": 2.0}, ValueError, "ratio must be in (0, 1]"),
        ("tome", {"keep": -1}, ValueError, "tome: keep must be >= 0"),
        ("aim", {"ratio": 0.5, "budget": 10}, ValueError, "aim: give one of ratio, budget"),
        ("aim", {"step": 1.5}, ValueError, "aim: step must be in [0, 1]"),
        ("aim", {"layer": 0}, ValueError, "aim: layer must be >= 1"),
        ("aim", {"layer": 6}, ValueError, "aim: layer 6 is past the model's 6 decoder layers"),
        ("holitom", {}, ValueError, "holitom: layer 18 is past the model's 6 decoder layers"),
        ("holitom", {"layer": 3, "threshold": 1.5}, ValueError, "holitom: threshold is a cosine similarity"),
        ("holitom", {"layer": 3, "merge": 1.0}, ValueError, "holitom: merge must be a share in [0, 1)"),
        ("temporal", {"threshold": 0.5, "budget": 10}, ValueError, "temporal: give one of threshold, budget"),
        ("temporal", {"threshold": -2}, ValueError, "temporal: threshold is a cosine similarity in [-1, 1]"),
        ("feather", {"layers": (2,)}, ValueError, "feather: give two layers"),
        ("feather", {"layers": (2, 7)}, ValueError, "feather: layer 7 is past the model's 6 decoder layers"),
        ("feather", {"layers": (2, 4), "stride": 0}, ValueError, "feather: stride must be >= 1"),
        ("feather", {"layers": (2, 4), "ratio": 0.3, "budget": 20}, ValueError, "give one of ratio, budget"),
        ("atp", {"layers": (2, 4), "mass": 0.0}, ValueError, "atp: mass must be in (0, 1]"),
        ("atp", {"layers": (2, 4), "spatial": 1.5}, ValueError, "atp: spatial must be in [0, 1]"),
        ("atp", {"layers": (0, 4)}, ValueError, "atp: layers must be increasing layer indices >= 1"),
        ("pmod", {"lowest": 0.9, "highest": 0.5}, ValueError, "pmod: need 0 <= lowest <= highest <= 1"),
        ("gsearch", {}, ValueError, "gsearch: give `keep`"),
        ("gsearch", {"keep": (64, 32, 48, 8, 8, 8), "visual": 64}, ValueError, "never grow with depth"),
        ("gsearch", {"keep": (576, 576, 288)}, ValueError, "gsearch: keep names 3 layers, the model has 6"),
        ("psigmoid", {"slope": 0}, ValueError, "psigmoid: slope must be > 0"),
        ("psigmoid", {"floor": 1.5}, ValueError, "psigmoid: floor must be in [0, 1]"),
        ("pipeline", {}, ValueError, "pipeline: give at least one stage"),
        ("pipeline", {"stages": [{"method": "fastvv"}]}, KeyError, "unknown method 'fastvv'"),
        ("pipeline", {"stages": ["fastv", {"method": "pdrop", "layers": (3, 4)}], "budget": 20}, ValueError,
         "a budget needs every stage but the last to cut before the language model; fastv cut inside it"),
        # integers must be integers and floats finite, for every parameter of every method
        ("fastv", {"k": 2.5}, TypeError, "fastv: k must be a 64-bit integer, got 2.5"),
        ("fastv", {"k": True}, TypeError, "fastv: k must be a 64-bit integer, got True"),
        ("fastv", {"keep": 1.5}, TypeError, "fastv: keep must be a 64-bit integer or None, got 1.5"),
        ("fastv", {"budget": float("nan")}, TypeError, "fastv: budget must be a finite number or None, got nan"),
        ("fastv", {"ratio": "0.5"}, TypeError, "fastv: ratio must be a finite number or None, got '0.5'"),
        ("pdrop", {"layers": (2.5, 4)}, TypeError, "pdrop: layers must be a list of 64-bit integers, got (2.5, 4)"),
        ("pdrop", {"layers": 2}, TypeError, "pdrop: layers must be a list of 64-bit integers, got 2"),
        ("pdrop", {"layers": (2, 4), "budget": float("nan")}, TypeError, "pdrop: budget must be a finite number"),
        ("pdrop", {"layers": (2, 4), "budget": float("inf")}, TypeError, "pdrop: budget must be a finite number"),
        ("random", {"seed": 1.5}, TypeError, "random: seed must be a 64-bit integer, got 1.5"),
        ("random", {"seed": 2**64}, TypeError, "random: seed must be a 64-bit integer, got 18446744073709551616"),
        ("random", {"layer": 1.5}, TypeError, "random: layer must be a 64-bit integer, got 1.5"),
        ("random", {"budget": float("nan")}, TypeError, "random: budget must be a finite number or None, got nan"),
        ("pooling", {"stride": float("nan")}, TypeError, "pooling: stride must be a 64-bit integer or None, got nan"),
        ("pooling", {"stride": 2.5}, TypeError, "pooling: stride must be a 64-bit integer or None, got 2.5"),
        ("pooling", {"stride": 10**30}, TypeError, "pooling: stride must be a 64-bit integer or None"),
        ("pooling", {"budget": float("nan")}, TypeError, "pooling: budget must be a finite number or None, got nan"),
        ("feather", {"layers": (2, 4), "stride": 1.5}, TypeError, "feather: stride must be a 64-bit integer"),
        ("psigmoid", {"slope": float("nan")}, TypeError, "psigmoid: slope must be a finite number, got nan"),
        ("psigmoid", {"center": float("nan")}, TypeError, "psigmoid: center must be a finite number, got nan"),
        ("psigmoid", {"budget": float("nan")}, TypeError, "psigmoid: budget must be a finite number or None"),
        ("pmod", {"shift": float("nan")}, TypeError, "pmod: shift must be a finite number, got nan"),
        ("aim", {"layer": 2.5}, TypeError, "aim: layer must be a 64-bit integer or None, got 2.5"),
        ("holitom", {"layer": 2.5}, TypeError, "holitom: layer must be a 64-bit integer, got 2.5"),
        ("temporal", {"budget": float("nan")}, TypeError, "temporal: budget must be a finite number or None"),
        ("gsearch", {"keep": []}, ValueError, "gsearch: keep must start at visual (576) and never grow with depth"),
        ("gsearch", {"keep": [0] * 6, "visual": 0}, ValueError, "gsearch: visual must be >= 1, got 0"),
        ("gsearch", {"keep": (576, 288.5, 100, 100, 100, 100)}, TypeError, "gsearch: keep must be a list of 64-bit"),
        ("pipeline", {"stages": {"method": "fastv"}}, TypeError, "pipeline: stages must be a list, got {'method'"),
        ("pipeline", {"stages": [{"method": "fastv", "k": 2.5}]}, TypeError, "fastv: k must be a 64-bit integer"),
        ("pipeline", {"stages": ["pooling"], "budget": float("nan")}, TypeError, "pipeline: budget must be a finite"),
    ],
)  # fmt: skip
def test_bad_method_is_refused_before_patching(llava, method, params, error, message):
    with pytest.raises(error) as raised:
        mmtoken.patch(llava, method, **params)
    assert message in str(raised.value)
    assert not hasattr(llava, "_mmtoken_handle")
    assert not llava.get_decoder().layers[0]._forward_pre_hooks


@pytest.mark.parametrize("method", sorted(name for name in METHODS if examples(name).too_deep is not None))
def test_a_layer_past_the_model_is_refused_for_every_method(llava, method):
    """Each registered method whose parameters name a decoder layer, given one past the tiny model's 6
    (`Examples.too_deep`), is refused at `mmtoken.patch`, before any hook is attached."""
    too_deep = examples(method).too_deep
    with pytest.raises(ValueError, match="6 decoder layers"):
        mmtoken.patch(llava, method, **too_deep)
    assert not hasattr(llava, "_mmtoken_handle")
    decoder = llava.get_decoder()
    assert not llava._forward_pre_hooks and not llava._forward_hooks and not decoder._forward_pre_hooks
    assert not any(layer._forward_pre_hooks for layer in decoder.layers)


def test_ready_method_object_is_checked_as_a_name_is(llava):
    with pytest.raises(TypeError, match=r"fastv: k must be a 64-bit integer, got 2\.5"):
        mmtoken.methods.FastV(k=2.5)
    method = mmtoken.methods.FastV()
    method.k = 2.5
    with pytest.raises(TypeError, match=r"fastv: k must be a 64-bit integer, got 2\.5"):
        mmtoken.patch(llava, method)
    assert not hasattr(llava, "_mmtoken_handle")


@pytest.mark.parametrize(
    ("method", "budget"),
    [
        ("fastv", 1000),
        ("pdrop", 65),
        ("random", 64.5),
        ("pooling", 99),
        ("visionzip", 65),
        ("divprune", 65),
        ("tome", 65),
        ("temporal", 65),
    ],
)
def test_budget_beyond_the_input_is_refused_before_the_language_model_runs(llava, layer_calls, method, budget):
    extra = {"layers": (2, 4)} if method == "pdrop" else {}
    mmtoken.patch(llava, method, budget=budget, **extra)
    with pytest.raises(ValueError, match="exceeds the 64 visual tokens"):
        greedy(llava, inputs("llava", False))
    assert not layer_calls


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("pmod", {"budget": 15}, r"budget 15 is unreachable with this schedule: the lowest is 18\.7"),
        ("feather", {"layers": (2, 4), "budget": 20}, r"budget 20 is unreachable with this schedule: the lowest is 2"),
        ("pipeline", {"stages": [{"method": "pdrop", "layers": (2, 4)}, {"method": "fastv", "k": 3}]},
         r"pipeline: step 2 \(fastv\) cuts at layer 3, not after the step before it \(its last cut is at layer 4\)"),
        ("aim", {"layer": 3, "budget": 60}, r"aim: budget 60 exceeds what this schedule keeps at ratio 1 \(\d"),
        ("holitom", {"layer": 3, "budget": 60}, r"holitom: budget 60 exceeds what this schedule keeps at ratio 1 \(\d"),
    ],
)  # fmt: skip
def test_schedule_that_cannot_be_made_is_refused_before_the_language_model_runs(llava, layer_calls, method, params,
                                                                                message):  # fmt: skip
    mmtoken.patch(llava, method, **params)
    with pytest.raises(ValueError, match=message):
        greedy(llava, inputs("llava", False))
    assert not layer_calls


def test_temporal_merging_of_an_image_is_refused(llava, layer_calls):
    mmtoken.patch(llava, "temporal")
    with pytest.raises(ValueError, match="temporal: row 0 holds no video"):
        greedy(llava, inputs("llava", False))
    assert not layer_calls


@pytest.mark.skipif(
    not hasattr(GenerationMixin, "_supports_mm_encoder_outputs"),
    reason="this transformers' generate() takes no features encoded ahead (mm_encoder_outputs)",
)
@pytest.mark.parametrize("method", ["visionzip", "holitom"])
def test_vision_signal_without_the_tower_running_is_refused(llava, layer_calls, method):
    """Features encoded before patching carry no attention: methods that rank by it say so."""
    batch = inputs("llava", False, batch=2)
    with torch.no_grad():
        encoded = llava.model.get_image_features(pixel_values=batch.pop("pixel_values"))
    mmtoken.patch(llava, method, **({"layer": 3} if method == "holitom" else {}))
    with pytest.raises(ValueError, match="attention covers 0 image tokens but the prompt holds 128"):
        greedy(llava, {**batch, "mm_encoder_outputs": {"image": encoded}})
    assert not layer_calls


def test_unreachable_budget_names_the_lowest(llava, layer_calls):
    mmtoken.patch(llava, "fastv", k=3, budget=10)
    with pytest.raises(ValueError, match=r"unreachable with a cut at layer 3: the lowest is 32\.0"):
        greedy(llava, inputs("llava", False))
    assert not layer_calls


def test_unsupported_family_names_the_supported_ones():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="'llama' is not supported; supported: llava, llava_next"):
        mmtoken.patch(LlamaForCausalLM(config), "fastv")


@pytest.mark.parametrize(
    ("family", "video", "through"),
    [
        ("llava", False, "generate"),
        ("llava", False, "forward"),
        ("qwen2_vl", False, "forward"),
        ("llava_onevision", True, "generate"),
    ],
)
def test_prompt_whose_visual_tokens_do_not_match_the_media(family, video, through):
    model, _ = model_and_processor(family)
    batch = inputs(family, video)
    token_id = model.config.video_token_id if video else model.config.image_token_id
    drop = (batch["input_ids"][0] == token_id).nonzero()[0]
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[drop] = False
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, keep], batch["attention_mask"][:, keep]
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = batch["mm_token_type_ids"][:, keep]
    calls = []
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        # transformers < 5.23 encodes video inside forward and checks the count itself, as clearly
        mismatch = r"tokens but its|features and (image|video) tokens do not match"
        with mmtoken.patched(model, "fastv"), pytest.raises(ValueError, match=mismatch):
            greedy(model, batch) if through == "generate" else model(**batch)
    finally:
        hook.remove()
    assert not calls


def test_right_padding_is_refused(llava, layer_calls):
    _, processor = model_and_processor("llava")
    processor.tokenizer.padding_side = "right"
    try:
        batch = inputs("llava", False, batch=2)
    finally:
        processor.tokenizer.padding_side = "left"
    mmtoken.patch(llava, "fastv")
    with pytest.raises(ValueError, match="needs left padding"):
        greedy(llava, batch)
    assert not layer_calls


def test_inputs_embeds_alone_are_refused(llava):
    batch = inputs("llava", False)
    embeds = llava.get_input_embeddings()(batch["input_ids"])
    mmtoken.patch(llava, "fastv")
    with pytest.raises(ValueError, match="needs input_ids"):
        llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_patching_twice_and_unpatching_twice_are_refused(llava):
    mmtoken.patch(llava, "fastv")
    with pytest.raises(RuntimeError, match="already patched"):
        mmtoken.patch(llava, "pdrop", layers=(2, 4))
    mmtoken.unpatch(llava)
    with pytest.raises(RuntimeError, match="not patched"):
        mmtoken.unpatch(llava)


def test_method_from_name_dict_yaml_and_object_agree(llava, tmp_path):
    batch = inputs("llava", False)
    path, upper = tmp_path / "method.yaml", tmp_path / "method.YML"
    for file in (path, upper):
        file.write_text("method: pdrop\nlayers: [2, 4]\nratio: 0.5\n")
    forms = [
        ("pdrop", PRUNING["pdrop"]),
        ({"method": "pdrop", **PRUNING["pdrop"]}, {}),
        (str(path), {}),
        (path, {}),
        (str(upper), {}),
        (mmtoken.methods.PyramidDrop(**PRUNING["pdrop"]), {}),
    ]
    results = []
    for method, params in forms:
        with mmtoken.patched(llava, method, **params) as handle:
            results.append((greedy(llava, batch), handle.stats.visual_tokens_per_layer))
    for tokens, per_layer in results[1:]:
        assert torch.equal(tokens, results[0][0]) and per_layer == results[0][1]


def test_object_with_extra_parameters_is_refused(llava):
    with pytest.raises(TypeError, match="given with a ready Method"):
        mmtoken.patch(llava, mmtoken.methods.FastV(), k=3)


@pytest.mark.parametrize(
    ("name", "text", "error", "message"),
    [
        ("missing.yaml", None, ValueError, r"cannot read the method file '.*missing\.yaml': No such file or directory"),
        ("malformed.yaml", "method: [pdrop\n", ValueError, r"the method file '.*malformed\.yaml' is not valid YAML"),
        ("list.yml", "- method: pdrop\n", TypeError, r"the method file '.*list\.yml' must hold a mapping"),
        ("empty.yaml", "", TypeError, r"the method file '.*empty\.yaml' must hold a mapping .*, not None"),
        ("typo.yaml", "method: pdrop\nlayers: [2.5, 4]\n", TypeError, r"pdrop: layers must be a list of 64-bit"),
    ],
)  # fmt: skip
def test_bad_method_file_is_refused_before_patching(llava, tmp_path, name, text, error, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    for method in (str(path), path):
        with pytest.raises(error, match=message):
            mmtoken.patch(llava, method)
    assert not hasattr(llava, "_mmtoken_handle")


@pytest.mark.parametrize(("family", "video"), [("llava", False), ("llava_next", False), ("qwen2_vl", True)])
def test_visual_tokens_without_their_pixels_are_refused(family, video):
    model, _ = model_and_processor(family)
    batch = {key: value for key, value in inputs(family, video).items() if not key.startswith("pixel_values")}
    calls = []
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    kind = "video" if video else "image"
    try:
        with mmtoken.patched(model, "fastv"), pytest.raises(ValueError, match=f"but the call has no {kind}s"):
            greedy(model, batch)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize(
    ("method", "params"),
    [("fastv", {"budget": 16}), ("pdrop", {"layers": (2, 4), "budget": 16}), ("pooling", {"budget": 16}),
     ("pmod", {"budget": 16}), ("holitom", {"layer": 3, "budget": 16}), ("fastv", {"ratio": 0.5})],
)  # fmt: skip
def test_text_only_prompt_passes_through_unchanged(llava, method, params):
    _, processor = model_and_processor("llava")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "what color is the box"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(text=[prompt], return_tensors="pt")
    expected = greedy(llava, batch)
    with mmtoken.patched(llava, method, **params) as handle:
        assert torch.equal(greedy(llava, batch), expected)
        assert handle.stats.visual_tokens_per_layer == [0.0] * 6


def test_a_budget_pools_the_image_row_of_a_batch_beside_a_text_only_row(llava):
    _, processor = model_and_processor("llava")
    contents = ([{"type": "text", "text": "what color"}], [{"type": "image"}, {"type": "text", "text": "what"}])
    chat = [[{"role": "user", "content": content}] for content in contents]
    prompts = [processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) for turns in chat]
    image = Image.new("RGB", (112, 112), (40, 80, 220))
    batch = processor(text=prompts, images=[image], padding=True, return_tensors="pt")
    with mmtoken.patched(llava, "pooling", budget=8) as handle:
        greedy(llava, batch)
    assert [row.avg_visual_tokens for row in handle.stats.rows] == [0, 9]  # stride 3 on its 8 x 8 grid


def test_rows_whose_budgets_cut_at_different_layers():
    """p-MoD's shift is solved per row for its budget, so rows of different visual counts cut at different layers:
    a batch keeps what each row keeps alone."""
    model, _ = model_and_processor("llava_next")
    per_row = []
    for row in (0, 1):
        with mmtoken.patched(model, "pmod", budget=153) as handle:
            greedy(model, inputs("llava_next", False, rows=[row]), 2)
            per_row.append(handle.stats.visual_tokens_per_layer)
    with mmtoken.patched(model, "pmod", budget=153) as handle:
        greedy(model, inputs("llava_next", False, batch=2), 2)
        assert handle.stats.visual_tokens_per_layer == [(a + b) / 2 for a, b in zip(*per_row, strict=True)]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"method": "atp", "layers": (1,)}, {"method": "aim", "layer": 1}],
         r"pipeline: step 2 \(aim\) cuts at layer 0, not after the step before it \(its last cut is at layer 1\)"),
        ([{"method": "atp", "layers": (1, 2)}, {"method": "pdrop", "layers": (3, 4), "budget": 10}],
         r"pipeline: step 2 \(pdrop\) has a budget, but the visual tokens it starts from are only known at layer 2"),
        ([{"method": "holitom", "layer": 2, "ratio": 0.1}, {"method": "pdrop", "layers": (3, 4), "budget": 60}],
         r"pdrop: budget 60 exceeds the \d+ visual tokens of this input"),
    ],
)  # fmt: skip
def test_pipeline_steps_after_a_deciding_cut_are_checked_before_the_language_model_runs(llava, layer_calls, stages,
                                                                                       message):  # fmt: skip
    """Steps after a cut whose scorer decides the count (ATP's inside the language model, HoliTom's merge before it)
    are planned once it is made; what can be checked before the language model runs is."""
    mmtoken.patch(llava, "pipeline", stages=stages)
    with pytest.raises(ValueError, match=message):
        greedy(llava, inputs("llava", False))
    assert not layer_calls


@pytest.mark.parametrize(("method", "params"), [("fastv", {"k": 2, "ratio": 0.5}), ("snapkv", {"capacity": 8})])
@pytest.mark.parametrize("failing_call", [1, 3], ids=["in-prefill", "in-decode"])
def test_a_call_that_raises_lets_its_request_go(llava, method, params, failing_call):
    """A forward that raises (out of memory, say) inside the language model leaves no request behind: its tensors
    go with the call, where they stayed held until the thread's next call (a server's next request ran short of
    memory by what the failed one held)."""
    from mmtoken.engine.request import active

    mmtoken.patch(llava, method, **params)
    seen, calls = [], []

    def watch(module, args):
        seen.append(weakref.ref(active()))

    def fail(module, args):
        calls.append(1)
        if len(calls) == failing_call:
            raise torch.OutOfMemoryError("injected")

    layers = llava.get_decoder().layers
    handles = [llava.get_decoder().register_forward_pre_hook(watch), layers[3].mlp.register_forward_pre_hook(fail)]
    try:
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            greedy(llava, inputs("llava", False))
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    assert seen and all(request() is None for request in seen)
    with pytest.raises(RuntimeError, match="outside a call of the patched model"):
        active()
