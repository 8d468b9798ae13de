"""The web page ``engine serve`` starts (gradio, an optional extra: ``pip install engine[serve]``).

Nothing is imported here: ``engine.web.app`` imports gradio, torch and the model code."""
