"""The skill-library lab: offline training data and the LoRA training that builds assets/adapters/.

``python -m lab build`` trains every adapter of the embedded library, then fits the
fusions over them (LoRA-Flow, CAT, LoraHub per language; a multi-task MixLoRA), seeded and
resumable; ``python -m lab data`` prints or writes samples of each data set;
``python -m lab eval-math`` measures greedy exact-match accuracy on the math problems;
``python -m lab eval`` writes the results table.
"""
