"""The one error of human feedback: an operation refused, with a reason a person can act on."""

from __future__ import annotations


class AnnotationError(ValueError):
    """A submission or account operation that was refused; nothing was stored.

    Raised by the accounts (:mod:`rlhf_workbench.human.accounts`), the items and their claims
    (:mod:`rlhf_workbench.human.items`), annotations, pairwise judgments and adjudications; the
    web app shows its message to the user as it is.
    """
