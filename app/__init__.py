"""FuseGPT Studio's web app: a Gradio interface over fusegpt_core."""
