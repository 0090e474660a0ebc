"""`make bench`: performance targets as ratios measured side by side in one run (design.md §7)."""
