"""Past one machine, on Ray (the ``cluster`` extra): campaigns whose units are Ray tasks
(:mod:`splitbits.cluster.campaign`) and the server half as a Ray Serve deployment with replicas
(:mod:`splitbits.cluster.serve`). Nothing below this package imports Ray; the runtime reaches it
only through the ``splitbits.extensions`` entry points (``serve --ray``, ``campaign --ray``)."""
