"""What a study writes for people: the HTML report (``html``) and results.md (``summary``).

``reuse_lens.report.write`` and ``write_comparison`` render a study and a set of circuits.
"""

from reuse_lens.report.html import FAITHFUL, HtmlReport, StudyLike, write, write_comparison

__all__ = ["FAITHFUL", "HtmlReport", "StudyLike", "write", "write_comparison"]
