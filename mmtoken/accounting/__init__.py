"""Cost accounting: FLOPs by the papers' formula and exactly, and the per-call stats a handle reports."""
