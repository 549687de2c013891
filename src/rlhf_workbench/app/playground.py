"""The web app's Playground tab: one question answered by the current policy and the reference.

The question (with the training instruction appended) is answered greedily by the latest
published policy and by the reference (base) model side by side; thumbs up / down on either
answer are stored as binary feedback with the version that wrote it
(:func:`rlhf_workbench.human.annotation.record_binary_feedback`; with ``algorithm: kto`` the next
round trains on them). Needs the ``playground`` or ``admin`` role, checked in every handler.
"""

from __future__ import annotations

import threading

import gradio as gr

from rlhf_workbench.app.auth import request_user
from rlhf_workbench.app.render import LATEX, answer_md
from rlhf_workbench.config import RunConfig
from rlhf_workbench.human.annotation import record_binary_feedback
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.model.loading import load_policy
from rlhf_workbench.model.rollout import generate
from rlhf_workbench.store import Store
from rlhf_workbench.tasks.task import Task


class PlaygroundModels:
    """The latest policy and the reference, loaded lazily and reloaded when a new version appears.

    Args:
        cfg: the run config (``model`` to load, ``eval.max_new_tokens`` per answer).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.version: int | None = None
        self.pair = None

    def answer(self, store: Store, prompt_task: Task) -> tuple[int, str, str]:
        """``(policy version, policy's answer, reference's answer)`` to ``prompt_task``, greedy,
        at most ``eval.max_new_tokens`` tokens each."""
        latest = store.latest_version()
        version = latest.id if latest is not None else 0
        with self.lock:
            if self.pair is None or version != self.version:
                ckpt = store.checkpoint_dir(latest) if latest is not None and latest.id > 0 else None
                self.pair = load_policy(self.cfg.model, checkpoint=ckpt)
                self.pair.policy.eval()
                self.version = version
            pair, ev = self.pair, self.cfg.eval

            def run(model):
                return generate(model, pair.tokenizer, [prompt_task], num_generations=1, do_sample=False,
                                max_new_tokens=ev.max_new_tokens, mixed_precision=self.cfg.model.mixed_precision)[0].text

            policy_text = run(pair.policy)
            with pair.reference_context():
                ref_text = run(pair.ref_model)
        return version, policy_text, ref_text


class Playground:
    """The Playground's handlers: ``ask`` and the thumbs of :meth:`rate`.

    Args:
        store: the run's database.
        models: the models that answer.
    """

    def __init__(self, store: Store, models: PlaygroundModels):
        self.store, self.models = store, models

    def ask(self, question: str, instruction: str, request: gr.Request):
        """Both models' answers to ``question`` (``instruction`` appended, as in training)."""
        try:
            request_user(self.store, request, "playground")
        except AnnotationError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None, f"**{e}**"
        if not question or not question.strip():
            gr.Warning("Type a question first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None, "Type a question first."
        task = Task(id="playground", question=question.strip(), answer="", answer_type="text",
                    instruction=(instruction or "").strip() or None)
        version, pol, ref = self.models.answer(self.store, task)
        state = {"prompt": task.prompt(), "policy": pol, "reference": ref, "version": version}
        return (f"#### Current policy v{version}", answer_md(pol), "#### Reference (base model, v0)",
                answer_md(ref), state, "Rate each answer: thumbs up or down.")

    def rate(self, which: str, label: bool):
        """The handler of one thumbs button: ``label`` (True = up) on the ``which`` answer
        (``policy`` or ``reference``) of the last question asked."""
        def fn(state: dict | None, request: gr.Request):
            try:
                uid = request_user(self.store, request, "playground")
            except AnnotationError as e:
                gr.Warning(str(e))
                return f"**{e}**"
            if not state or not isinstance(state, dict) or which not in state or "prompt" not in state:
                gr.Warning("Ask a question first.")
                return "Ask a question first."
            version = state["version"] if which == "policy" else 0
            try:
                record_binary_feedback(self.store, uid, version, state["prompt"], state[which], label)
            except AnnotationError as e:
                gr.Warning(str(e))
                return f"**{e}**"
            return f"Recorded thumbs {'up' if label else 'down'} for the {which} answer (v{version})."
        return fn


def _answer_column(title: str, elem: str):
    """One model's column: ``(title, answer, thumbs up, thumbs down)``."""
    with gr.Column():
        head = gr.Markdown(title)
        answer = gr.Markdown(elem_id=f"{elem}-answer", latex_delimiters=LATEX)
        with gr.Row():
            up = gr.Button("Thumbs up", elem_id=f"{elem}-up", scale=0)
            down = gr.Button("Thumbs down", elem_id=f"{elem}-down", scale=0)
    return head, answer, up, down


def playground_tab(playground: Playground, instruction: str | None) -> None:
    """Lay out the Playground in the current context and wire it to ``playground``;
    ``instruction``: the run's ``tasks.instruction``, the instruction box's default."""
    question = gr.Textbox(label="Question", lines=3, elem_id="pg-question")
    instruction_box = gr.Textbox(label="Answer instruction appended to the question (as in training)",
                                 value=instruction or "", elem_id="pg-instruction")
    ask_btn = gr.Button("Ask both models", variant="primary", elem_id="ask-btn")
    state = gr.State(None)
    with gr.Row():
        pol_title, pol_answer, pol_up, pol_down = _answer_column("#### Current policy", "policy")
        ref_title, ref_answer, ref_up, ref_down = _answer_column("#### Reference (base model)", "reference")
    status = gr.Markdown(elem_id="pg-status")
    ask_btn.click(playground.ask, [question, instruction_box], [pol_title, pol_answer, ref_title, ref_answer, state,
                                                                  status], api_visibility="private", concurrency_limit=1)
    for btn, which, label in ((pol_up, "policy", True), (pol_down, "policy", False),
                              (ref_up, "reference", True), (ref_down, "reference", False)):
        btn.click(playground.rate(which, label), [state], [status], api_visibility="private", concurrency_limit=None)
