"""The server's JSON-lines log carries the API's and the engine's records, one object per
line, and leaves the loggers as it found them."""

from __future__ import annotations

import io
import json
import logging

from serving.api.logs import json_logging


def test_api_and_engine_records_become_json_lines():
    stream = io.StringIO()
    engine_log = logging.getLogger("serving.engine.coserve.coserver")
    before = engine_log.propagate, logging.getLogger("serving").level
    with json_logging(stream=stream):
        logging.getLogger("adapterhub.api").info("serving on %s", "127.0.0.1:1")
        engine_log.warning("co-serving: %d MiB do not fit", 7)
        logging.getLogger("serving.engine").debug("below the level: not written")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["level"], x["logger"], x["message"]) for x in lines] == [
        ("INFO", "adapterhub.api", "serving on 127.0.0.1:1"),
        ("WARNING", "serving.engine.coserve.coserver", "co-serving: 7 MiB do not fit"),
    ]
    assert (engine_log.propagate, logging.getLogger("serving").level) == before
