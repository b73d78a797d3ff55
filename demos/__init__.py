"""Demos: the Gradio comparison app."""
