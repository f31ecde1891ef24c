"""Model-side code of SD Studio: configuration, loading, capabilities and the output guard.

Nothing here imports gradio, and nothing is loaded at import time.
"""
