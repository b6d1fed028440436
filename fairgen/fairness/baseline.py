"""``fair.method='baseline'``: no mitigation; train on ``data.options.subset`` as it is."""

from fairgen.fairness.registry import METHODS, Method

METHODS.register("baseline")(Method(summary="nothing changes: the data as it is"))
