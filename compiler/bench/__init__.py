"""The edit benchmark (``editc bench``): the harness and the baselines it compares editc with
(ESD, Concept Ablation, UCE, TIME). Part of the package so that ``editc bench`` works from an
installed wheel; a measurement, not part of the compiler's pipeline."""
