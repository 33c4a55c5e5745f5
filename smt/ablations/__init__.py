"""Ablations of the method's claims (``notebooks/ablations/``): statistics over seeds, Pareto fronts, DVC
experiment collection (:mod:`stats`, :mod:`experiments`) and the runs themselves (:mod:`runs`)."""
