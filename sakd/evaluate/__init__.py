"""Evaluation: bits per byte for text (``bpb``) and chat (``chat_bpb``), retention (``retention``) and
``sakd align``'s report (``alignment``). The ``sakd evaluate`` command and the report's expert usage are in
``sakd.report.run``."""
