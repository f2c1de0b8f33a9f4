"""FuseGPT Studio: `python app.py` opens the web app on the bundled model.

Server address and port follow GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 0.0.0.0:7860).
"""

import importlib.util
import logging
import os

if importlib.util.find_spec("spaces") is not None:  # on Hugging Face Spaces; optional everywhere else
    import spaces  # noqa: F401  (imported before torch touches CUDA, as Spaces' GPU hardware expects)

from app.state import TEST_SOURCE, get_context
from app.ui import build_ui, launch_kwargs
from app.work import make_warmup_job

demo = build_ui()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    context = get_context()
    if context.autoload:  # load the default model while the server starts
        source = TEST_SOURCE if context.test_model else "bundled"
        context.runner.submit(make_warmup_job(context, source), owner="server", kind="load", title="Warm-up")
    demo.queue(default_concurrency_limit=16)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        **launch_kwargs(),
    )
