"""Tasks: the task model and the checks on a record's fields (``task``), reading task files
(``files``), the task file formats (``loading``), train/held-out splits (``split``), open-ended
tasks without an answer key (``open``) and the preference-file formats of ``rlhf train``
(``preferences``)."""
