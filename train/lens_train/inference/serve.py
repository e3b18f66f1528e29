"""``lens-serve``: a web demo of a trained LENS run (Gradio): segment an image, or chat with the agent.

Two tabs around one model, loaded once at start-up:

* **Segment**: an image (upload, or one of :data:`EXAMPLES`) and an instruction ->
  the mask overlay (keypoints as white dots), the grounding heatmap with its keypoints,
  the score (SAM's predicted IoU), the mask's fraction of the image, and ``mask.png``
  (0/255, the image's size, as ``lens-segment`` writes it) to download.
* **Chat**: the agent of ``lens-chat`` (:class:`~lens_train.inference.agent.LensAgent`): each
  turn is routed to dialogue, segmentation or a follow-up; each browser session has its
  own image and memory.

Requests go through Gradio's queue one at a time (concurrency 1, at most ``--queue-size``
waiting); a waiting page shows its place in the queue. A bad request (no image, a file
that is not an image, an image over the size limit of :func:`lens_cache.images.read_rgb`,
an empty instruction, one over :data:`MAX_INSTRUCTION_CHARS`) gets its one-line message in
the page and the server goes on; any other exception is a bug: its traceback goes to the
server's log and the page says so.

The request functions (:class:`DemoBackend`) do not need Gradio; :func:`build_app` wires
them into a ``gr.Blocks``. Usage::

    lens-serve                                   # the shipped toy head + toy backbones, http://127.0.0.1:7860
    lens-serve --checkpoint runs/official --mllm llava-hf/llava-1.5-7b-hf --sam vit_h:sam.pth --device cuda
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from PIL import Image, ImageDraw

from ..cli import command_app, user_errors
from .options import MaxNewTokensOption, MllmOption, SamOption
from ..errors import UserError
from .segmenter import check_instruction, load_image

if TYPE_CHECKING:
    from .agent import Memory
    from .result import SegmentResult
    from .segmenter import Segmenter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

log = logging.getLogger("lens_train.serve")

#: Longest instruction accepted (characters); longer ones are refused with a message.
MAX_INSTRUCTION_CHARS = 2000
#: Largest upload Gradio accepts (its ``max_file_size``); pixel limits are read_rgb's.
MAX_UPLOAD = "25mb"
EXAMPLES_DIR = Path(__file__).with_name("examples")
#: (file in :data:`EXAMPLES_DIR`, instruction). The images are synthetic scenes
#: (``lens_manifests.synthetic.make_scene(np.random.default_rng([2024, seed]), rule="cv2", num_shapes=4)``
#: for seeds 4, 2, 6), the world the toy head was trained on.
EXAMPLES = (
    ("shapes_circle.png", "Can you segment the purple circle in this image?"),
    ("shapes_hexagons.png", "Which shape is red? Please segment it."),
    ("shapes_triangles.png", "Segment the triangle on the right."),
)
HEATMAP_ALPHA = 0.75
#: The queue's concurrency group of every event that runs the model: one runs at a time, the rest wait in line.
MODEL = "lens-model"


def open_segmenter(checkpoint: str | Path, mllm: str | None = None, sam: str | None = None,
                   device: str | None = None) -> Segmenter:
    """The model the demo serves (``Segmenter.from_pretrained``: a run or model folder, ``toy`` the shipped head)."""
    from .segmenter import Segmenter

    return Segmenter.from_pretrained(checkpoint, mllm=mllm, sam=sam, device=device)


def check_request_text(text: str | None, what: str = "instruction") -> str:
    """``text`` as typed (the model gets what the Python API would); refused (UserError, one line) when over
    :data:`MAX_INSTRUCTION_CHARS`, or, for an instruction, when blank."""
    text = text or ""
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise UserError(f"the {what} is {len(text)} characters long; the limit is {MAX_INSTRUCTION_CHARS}")
    return check_instruction(text) if what == "instruction" else text


def image_source(value: Any) -> str | Path | Image.Image | None:
    """What an image input holds: a path, a PIL image, or Gradio's file payload (``{"path": ...}``)."""
    if isinstance(value, dict):
        return value.get("path")
    return value


def require_image(value: Any) -> str | Path | Image.Image:
    """The image of an input, its header checked; UserError (one line) when there is none, it is not an
    image, or a side is over the limit (``LENS_MAX_IMAGE_SIDE``), all before a pixel is decoded."""
    from lens_cache import images
    from lens_manifests.common import MAX_IMAGE_SIDE_ENV, max_image_side

    source = image_source(value)
    if source is None or source == "":
        raise UserError("no image: upload one (or pick an example) first")
    if isinstance(source, Image.Image):
        return source
    name = Path(str(source)).name  # the upload's own name, not the server's folder
    try:
        with images.opened_image(source) as header:
            size = (header.height, header.width)
    except images.ImageReadError as error:
        raise images.ImageReadError(str(error).replace(str(source), name), reason=error.reason) from None
    if hasattr(images, "check_side"):  # the library's own limit and message
        images.check_side(size, name)
    elif max(size) > (limit := max_image_side()):
        raise UserError(f"image {name} is {size[1]}x{size[0]}, above the limit of {limit} px "
                        f"per side: downscale it (or set {MAX_IMAGE_SIDE_ENV} to allow it)")
    return source


def heatmap_image(result: SegmentResult, alpha: float = HEATMAP_ALPHA) -> Image.Image:
    """The grounding heatmap over the image (jet colours, opaque in proportion to the map: at most ``alpha``),
    with the keypoints that prompted SAM as white dots."""
    import matplotlib
    import numpy as np

    from ..figures import heatmap_on_image

    heat = heatmap_on_image(result.heatmap, result.input_size, result.original_size).clip(0.0, 1.0)
    image = result.image.convert("RGB")
    scale = image.width / result.original_size[1]  # 1 unless the segmenter worked on a downscaled copy
    if heat.shape != (image.height, image.width):
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(image.size, Image.BILINEAR))
    colour = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * heat)[..., None]  # the image shows through where the map is cold
    picture = Image.fromarray(((1 - weight) * np.asarray(image, np.float32) + weight * colour).round().clip(0, 255)
                              .astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(2.0, min(image.size) / 80)
    for x, y in np.asarray(result.keypoints_xy, dtype=np.float64) * scale:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    return picture


@dataclass
class SegmentView:
    """What the Segment tab shows for one request."""

    overlay: Image.Image
    heatmap: Image.Image
    score: float
    fraction: float
    mask_path: Path
    result: SegmentResult

    @property
    def text(self) -> str:
        summary = self.result.summary()
        return (f"score (SAM's predicted IoU) {self.score:.3f}; mask {summary['mask_pixels']} px "
                f"({100 * self.fraction:.2f}% of the image); {len(summary['keypoints_xy'])} keypoint(s)")


@dataclass
class ChatState:
    """One browser session's chat: the agent's image and memory, and the conversation shown."""

    image: Image.Image | None = None
    image_key: Any = None
    memory: Memory | None = None
    turn: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    folder: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


def _problem(error: Exception) -> str | None:
    """The one-line message of a user's mistake, or None for a bug."""
    from lens_cache.cli import user_error_types
    from lens_cache.errors import one_line

    return " ".join(one_line(error).split()) if isinstance(error, user_error_types()) else None


def _report(error: Exception) -> str:
    """Status text for a failed request: the user's mistake as is; a bug logged with its traceback."""
    message = _problem(error)
    if message is None:
        log.exception("lens-serve: request failed")
        message = f"internal error ({type(error).__name__}: {error}); the traceback is in the server's log"
    _toast(message)
    return f"**error:** {message}"


def _toast(message: str) -> None:
    """A warning pop-up in the page (outside a Gradio request: a Python warning; without Gradio: nothing)."""
    gr = sys.modules.get("gradio")
    if gr is not None:
        gr.Warning(message)


class DemoBackend:
    """The demo's request functions around one loaded :class:`Segmenter` (no Gradio needed).

    Args:
        segmenter: the model, loaded once.
        work_dir: where masks and chat figures are written (default: a new temporary folder).
        max_new_tokens: length limit of the chat's dialogue and follow-up answers.
        router, generate: passed to :class:`~lens_train.inference.agent.LensAgent` (tests stub them).
        name: how the page names the model (default: the segmenter's folder).
    """

    def __init__(self, segmenter: Segmenter, *, work_dir: str | Path | None = None, max_new_tokens: int = 64,
                 router: Any = None, generate: Any = None, name: str | None = None) -> None:
        self.segmenter = segmenter
        self.name = name or str(getattr(segmenter, "run_dir", "?"))
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="lens-serve-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.max_new_tokens, self.router, self.generate = max_new_tokens, router, generate
        self._lock = threading.Lock()  # the model serves one request at a time, whatever the queue allows

    # -- Segment tab ------------------------------------------------------------

    def segment(self, image: Any, instruction: str | None) -> SegmentView:
        """Segment ``image`` by ``instruction``; UserError (one line) for bad input."""
        import numpy as np

        instruction = check_request_text(instruction)
        source = require_image(image)
        with self._lock:
            result = self.segmenter.segment(source, instruction)
        folder = Path(tempfile.mkdtemp(prefix="mask-", dir=self.work_dir))
        mask_path = folder / "mask.png"
        from .result import mask_picture

        mask_picture(result.mask).save(mask_path)  # as lens-segment's mask.png
        fraction = float(result.mask.mean()) if result.mask.size else 0.0
        overlay = result.overlay()
        return SegmentView(overlay=overlay,
                           heatmap=heatmap_image(result), score=result.iou_prediction, fraction=fraction,
                           mask_path=mask_path, result=result)

    def segment_request(self, image: Any, instruction: str | None) -> tuple:
        """The Segment tab's event: (overlay, heatmap, score, mask area in %, mask file, status); never raises."""
        try:
            view = self.segment(image, instruction)
        except Exception as error:  # noqa: BLE001 - shown in the page; bugs are logged with their traceback
            return None, None, None, None, None, _report(error)
        return (view.overlay, view.heatmap, round(view.score, 4), round(100 * view.fraction, 3), str(view.mask_path),
                view.text)

    # -- Chat tab ---------------------------------------------------------------

    def chat(self, state: ChatState | None, message: str | None, image: Any = None) -> ChatState:
        """One agent turn (as ``lens-chat`` serves a line); a new image becomes the current one first."""
        from .agent import LensAgent

        state = state if state is not None else ChatState()
        message = check_request_text(message, "message")
        if not message.strip():
            raise UserError("the message is empty: ask something, or ask to segment something in the image")
        source = image_source(image)
        if source is not None and source != state.image_key:
            state.image, state.image_key = load_image(require_image(image)), source
        agent = LensAgent(self.segmenter, router=self.router, generate=self.generate,
                          figure_dir=self.work_dir / "chat" / state.folder, max_new_tokens=self.max_new_tokens)
        agent.image, agent.memory, agent.turn = state.image, state.memory, state.turn
        with self._lock:
            reply = agent.step(message)
        state.memory, state.turn = agent.memory, agent.turn
        state.history.append({"role": "user", "content": message})
        state.history.append({"role": "assistant", "content": f"[{reply.kind}] {reply.text}"})
        if reply.figure_path is not None:
            state.history.append({"role": "assistant", "content": {"path": str(reply.figure_path)}})
        return state

    def chat_request(self, state: ChatState | None, message: str | None, image: Any = None) -> tuple:
        """The Chat tab's event: (conversation, state, cleared textbox, status); never raises."""
        state = state if state is not None else ChatState()
        try:
            state = self.chat(state, message, image)
        except Exception as error:  # noqa: BLE001 - shown in the page; bugs are logged with their traceback
            return state.history, state, message, _report(error)
        return state.history, state, "", ""

    @staticmethod
    def forget_request(state: ChatState | None) -> tuple:
        """``/forget``: clear the memory (no follow-up until the next segmentation)."""
        state = state if state is not None else ChatState()
        state.memory = None
        return state, "memory cleared"


def build_app(backend: DemoBackend, *, title: str = "LENS", queue_size: int = 32) -> Any:
    """The Gradio Blocks of the demo, queued one request at a time (``queue_size`` waiting at most)."""
    import gradio as gr

    with gr.Blocks(title=f"{title} web demo") as demo:
        gr.Markdown(f"## {title}: segmentation for a frozen multimodal LLM\n"
                    f"Model: `{backend.name}` on {backend.segmenter.device}. One request at a time; "
                    f"a waiting request shows its place in the queue. Instructions up to {MAX_INSTRUCTION_CHARS} characters.")
        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="image", sources=["upload", "clipboard"], elem_id="lens-image", height=320)
                    instruction = gr.Textbox(label="instruction", max_lines=4, max_length=MAX_INSTRUCTION_CHARS,
                                             placeholder="e.g. Can you segment the purple circle in this image?",
                                             elem_id="lens-instruction")
                    run = gr.Button("Segment", variant="primary", elem_id="lens-run")
                    examples = [[str(EXAMPLES_DIR / name), text] for name, text in EXAMPLES
                                if (EXAMPLES_DIR / name).is_file()]
                    if examples:
                        gr.Examples(examples, inputs=[image, instruction], label="examples (synthetic scenes)")
                with gr.Column():
                    status = gr.Markdown(elem_id="lens-status")
                    overlay = gr.Image(label="mask overlay (keypoints: white dots)", format="png",
                                       interactive=False, elem_id="lens-overlay", height=320)
                    heat = gr.Image(label="heatmap + keypoints", format="png", interactive=False,
                                    elem_id="lens-heatmap", height=320)
                    with gr.Row():
                        score = gr.Number(label="score (SAM's predicted IoU)", interactive=False, elem_id="lens-score")
                        fraction = gr.Number(label="mask area (% of the image)", interactive=False,
                                             elem_id="lens-fraction")
                    mask = gr.File(label="mask.png (0/255, download)", interactive=False, elem_id="lens-mask")
            outputs = [overlay, heat, score, fraction, mask, status]
            run.click(backend.segment_request, [image, instruction], outputs, preprocess=False, api_name="segment",
                      concurrency_id=MODEL)
            instruction.submit(backend.segment_request, [image, instruction], outputs, preprocess=False,
                               api_visibility="private", concurrency_id=MODEL)
        with gr.Tab("Chat"):
            state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1):
                    chat_image = gr.Image(label="image (optional)", sources=["upload", "clipboard"],
                                          elem_id="lens-chat-image", height=280)
                    forget = gr.Button("Forget the last mask", elem_id="lens-forget")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="LENS agent (dialogue / segmentation / follow-up)",
                                         elem_id="lens-chatbot", height=420)
                    message = gr.Textbox(label="message", max_length=MAX_INSTRUCTION_CHARS, elem_id="lens-message",
                                         placeholder="e.g. Segment the star. / What colour is the segmented shape?")
                    send = gr.Button("Send", variant="primary", elem_id="lens-send")
                    chat_status = gr.Markdown(elem_id="lens-chat-status")
            chat_outputs = [chatbot, state, message, chat_status]
            for event in (send.click, message.submit):
                event(backend.chat_request, [state, message, chat_image], chat_outputs, preprocess=False,
                      api_visibility="private", concurrency_id=MODEL)
            forget.click(backend.forget_request, [state], [state, chat_status], api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    return demo


def launch(demo: Any, backend: DemoBackend, *, host: str, port: int | None, block: bool = True) -> Any:
    """Start the server (``block=False``: in a background thread, for tests)."""
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                       ssr_mode=False, max_file_size=MAX_UPLOAD, allowed_paths=[str(backend.work_dir)],
                       show_error=False, quiet=False)


# ----------------------------------------------------------------------------- CLI

app = command_app(help="Web demo of a LENS run (Gradio): segment an image, or chat with the agent.")


@app.command()
def serve(
    checkpoint: Annotated[str, typer.Option(help="Run folder written by lens-train, or 'toy' (the shipped toy head).")] = "toy",
    mllm: MllmOption = None,
    sam: SamOption = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cpu for the toy head, else cuda when available).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; there is no login).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    max_new_tokens: MaxNewTokensOption = 64,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait in the queue (one runs at a time).")] = 32,
) -> None:
    """Serve a web page to segment images and chat with a LENS run; the model is loaded once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    with user_errors():
        if not 0 < port < 65536:
            raise UserError(f"--port {port} is not a TCP port (1-65535)")
        started = time.perf_counter()
        if device is None and checkpoint == "toy":
            device = "cpu"  # the toy backbones are made for a CPU: a GPU gains nothing on them
        segmenter = open_segmenter(checkpoint, mllm=mllm, sam=sam, device=device)
        log.info("model %s loaded on %s in %.1f s", segmenter.run_dir, segmenter.device, time.perf_counter() - started)
    backend = DemoBackend(segmenter, max_new_tokens=max_new_tokens, name=checkpoint)
    demo = build_app(backend, queue_size=queue_size)
    launch(demo, backend, host=host, port=port)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

