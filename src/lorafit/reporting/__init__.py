"""What a run tells a person: metrics, report.json / report.md, plots."""
