"""The Gradio page of `mmtoken demo`: the unpatched model next to up to four methods on one input, and the
`compare` API endpoint that returns the same numbers as JSON."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from mmtoken import list_methods
from mmtoken.demos.comparison import MAX_METHODS, Comparer, embedded_models
from mmtoken.demos.media import MAX_BYTES, probe_examples, read_media, write_probe_example
from mmtoken.demos.overlay import survival_overlay, tokens_chart
from mmtoken.zoo.embedded import METHOD_DEFAULTS

NONE = "none"
DEFAULT_SLOTS = (("fastv", 128), ("pdrop", 128), ("uniform", 64), (NONE, 64))
USER_ERRORS = (ValueError, KeyError, TypeError, OSError)
# the method slots start with the settings the embedded probe models (six decoder layers) need
PROBE_PARAMETERS = METHOD_DEFAULTS["probe-llava"]


def _message(error: Exception) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _parameters_for(name: str) -> str:
    return json.dumps(PROBE_PARAMETERS.get(name, {}))


def _slot_methods(slots: tuple) -> list[dict]:
    """The method slots (name, budget, parameters as JSON) as method dicts; slots set to none are left out."""
    methods = []
    for name, budget, parameters in zip(slots[0::3], slots[1::3], slots[2::3], strict=True):
        if name == NONE:
            continue
        try:
            extra = json.loads(parameters or "{}")
        except json.JSONDecodeError as error:
            raise ValueError(f'{name}: parameters must be a JSON object, such as {{"k": 1}} ({error})') from error
        if not isinstance(extra, dict):
            raise ValueError(f'{name}: parameters must be a JSON object, such as {{"k": 1}}')
        methods.append({"method": name, **({} if budget is None else {"budget": budget}), **extra})
    return methods


def _metrics(column: dict) -> str:
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| prefill | {1000 * column['prefill_seconds']:.1f} ms |",
        f"| TTFT | {1000 * column['ttft_seconds']:.1f} ms |",
        f"| visual tokens per layer | {column['avg_visual_tokens']:.0f} of {column['original_visual_tokens']:.0f} |",
        f"| FLOPs paper / exact | {column['flops_ratio_paper']:.0%} / {column['flops_ratio_exact']:.0%} |",
        f"| KV cache | {column['kv_bytes'] / 2**20:.2f} MiB |",
    ])  # fmt: skip


def _title(method: dict) -> str:
    name, parameters = method["method"], {key: value for key, value in method.items() if key != "method"}
    return f"### {name}" + (f" `{json.dumps(parameters)}`" if parameters else "")


def build_app(comparer: Comparer) -> gr.Blocks:
    """The page; every request goes through `comparer`, so one loaded model serves them all, one at a time."""
    names = [method["name"] for method in list_methods()]
    examples_folder = Path(tempfile.mkdtemp(prefix="mmtoken-demo-"))
    with gr.Blocks(title="mmtoken demo") as app:
        gr.Markdown(
            "# mmtoken: visual-token reduction, side by side\n"
            "The same question on the same image or video, answered by the unpatched model and by each method. "
            "The unpatched column runs through a patch that keeps every token (same answers, hooks' cost included)."
        )
        with gr.Row():
            with gr.Column():
                models = comparer.models
                model = gr.Dropdown(models, value=models[0] if models else None,
                                    label="model: the embedded probe models and those named by --models")  # fmt: skip
                media = gr.File(label=f"image or video (at most {MAX_BYTES // 2**20} MiB)", elem_id="media")
                preview = gr.Image(label="input", interactive=False, height=240)
                with gr.Row():
                    example = gr.Dropdown(probe_examples(), value="image: count", label="probe example")
                    seed = gr.Number(value=1, precision=0, label="seed")
                    use_example = gr.Button("use example", elem_id="use-example")
                question = gr.Textbox(label="question", elem_id="question")
                truth = gr.Markdown()
                new_tokens = gr.Slider(1, 64, value=8, step=1, label="new tokens")
            with gr.Column():
                slots = []
                for index, (name, budget) in enumerate(DEFAULT_SLOTS):
                    with gr.Row():
                        choice = gr.Dropdown([NONE, *names], value=name, label=f"method {index + 1}")
                        amount = gr.Number(value=budget, precision=0, label="budget (visual tokens per layer)")
                        parameters = gr.Textbox(value=_parameters_for(name), label="other parameters (JSON)")
                    choice.change(_parameters_for, choice, parameters, api_visibility="private")
                    slots += [choice, amount, parameters]
                gr.Markdown(
                    "Parameters prefilled for the 6-layer probe models; "
                    + "; ".join(f"**{m['name']}** ({m['paper']}): {', '.join(m['parameters'])}" for m in list_methods())
                )
                run = gr.Button("compare", variant="primary", elem_id="compare")
        outputs = []
        with gr.Row():
            for index in range(1 + MAX_METHODS):
                with gr.Column(min_width=200, visible=index == 0) as column:
                    outputs += [
                        column,
                        gr.Markdown(elem_id=f"title-{index}"),
                        gr.Textbox(label="answer", elem_id=f"answer-{index}", interactive=False),
                        gr.Markdown(elem_id=f"metrics-{index}"),
                        gr.Plot(label="visual tokens per layer", show_label=False, elem_id=f"chart-{index}"),
                        gr.Image(
                            label="patches alive at each stage",
                            show_label=False,
                            elem_id=f"overlay-{index}",
                            interactive=False,
                        ),
                    ]
        with gr.Accordion("the same numbers as JSON", open=False):
            numbers = gr.JSON()
        with gr.Column(visible=False):
            api_methods, api_result, api_trigger = gr.JSON(), gr.JSON(), gr.Button()

        def show_example(choice: str, seed_value: float) -> tuple:
            file, asked, answer = write_probe_example(choice, int(seed_value or 0), examples_folder)
            return str(file), asked, f"true answer: **{answer}**"

        def show_preview(file: str | None):
            try:
                return None if file is None else read_media(file).frames[0]
            except USER_ERRORS as error:
                raise gr.Error(_message(error)) from error

        def compare_page(model_name: str, file: str | None, asked: str, tokens: float, *slot_values) -> list:
            try:
                result = comparer.compare(model_name, file, asked, _slot_methods(slot_values), int(tokens))
                loaded = read_media(file)
            except USER_ERRORS as error:
                raise gr.Error(_message(error)) from error
            columns = result["columns"]
            reference, grid = columns[0]["visual_tokens_per_layer"], columns[0]["alive"]["0"]
            values = []
            for index in range(1 + MAX_METHODS):
                if index >= len(columns):
                    values += [gr.Column(visible=False)] + [None] * 5
                    continue
                column = columns[index]
                values += [
                    gr.Column(visible=True),
                    _title(column["method"]),
                    column["answer"],
                    _metrics(column),
                    tokens_chart(column["visual_tokens_per_layer"], reference, column["method"]["method"]),
                    survival_overlay(loaded, column["alive"], grid, result["center_crop"]),
                ]
            return [*values, result]

        def compare_api(model_name: str, file: str | None, asked: str, methods: list, tokens: float) -> dict:
            try:
                return comparer.compare(model_name, file, asked, methods, int(tokens))
            except USER_ERRORS as error:
                raise gr.Error(_message(error)) from error

        use_example.click(show_example, [example, seed], [media, question, truth], api_visibility="private")
        media.change(show_preview, media, preview, api_visibility="private")
        run.click(compare_page, [model, media, question, new_tokens, *slots], [*outputs, numbers],
                  api_visibility="private")  # fmt: skip
        api_trigger.click(
            compare_api, [model, media, question, api_methods, new_tokens], api_result, api_name="compare"
        )
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, models: Sequence[str] = ()) -> None:
    """Load the first of the embedded probe models and `models` (local folders or hub ids, the only others the
    page offers), then serve the page (requests queue) until interrupted."""
    comparer = Comparer(list(dict.fromkeys([*embedded_models(), *models])))
    build_app(comparer).queue().launch(server_name=host, server_port=port, show_error=True, max_file_size=MAX_BYTES)
