"""`python tests/elastic_rank.py TRAIN-FLAGS...` under horovodrun: hvdsgd.train's main, then each
rank writes ``$HVDSGD_TEST_RANKS/<pid>.json``: its host, final rank and world size, and a digest
of the parameters it ended with (the model of its last evaluation, which every rank runs).

With ``HVDSGD_TEST_HOLD=PATH`` every rank's first look at the host changes (its first commit)
waits until PATH exists (at most 60 s): a test that changes the hosts, waits and then creates
PATH sees the change reach the run however fast this machine trains."""

import hashlib
import json
import os
import sys
import time

from hvdsgd import dist, elastic, train

seen = {}
_evaluate = train.evaluate
_host_view = elastic.TrainState.host_view


def evaluate(model, *args, **kwargs):
    seen["model"] = model
    return _evaluate(model, *args, **kwargs)


def host_view(self):
    hold = os.environ.get("HVDSGD_TEST_HOLD")
    if hold and not seen.get("held"):
        seen["held"] = True
        deadline = time.monotonic() + 60
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
    return _host_view(self)


train.evaluate = evaluate
elastic.TrainState.host_view = host_view
train.main(sys.argv[1:])
digest = hashlib.sha256(
    b"".join(t.detach().cpu().numpy().tobytes() for t in seen["model"].state_dict().values())
).hexdigest()
report = {"host": dist.host(), "rank": dist.rank(), "size": dist.size(), "digest": digest}
with open(os.path.join(os.environ["HVDSGD_TEST_RANKS"], f"{os.getpid()}.json"), "w") as fh:
    json.dump(report, fh)
