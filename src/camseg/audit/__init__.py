"""CAM audit: where the classifier looks, whether its maps are faithful, and shortcuts.

``metrics`` (energy pointing, pointing game, out-of-body and border/corner shares),
``faithfulness`` (deletion/insertion AUC, confidence change), ``shortcut`` (image and
dataset flags), ``stage`` (the ``audit`` stage and the standalone command) and ``report``
(its section of report.md). See docs/audit.md.
"""
