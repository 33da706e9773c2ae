"""
Classroom exercises: write the key parts of CLIP yourself, checked automatically against this project's own code.

Each exercise is a stub file here (exercises/clip_loss.py, ...) that a learner copies into a workspace and fills in;
`checks.py` compares the learner's function with the project's function on seeded random inputs; `grading.py` runs
those comparisons and reports them the way Karpathy's backprop exercise's `cmp` does (exact / approximate / max
difference), with the relative error CS231n's assignments print. The command line is exercises.py at the repository
root; the teachers' guide is exercises/README.md. Project modules never import this package.
"""
