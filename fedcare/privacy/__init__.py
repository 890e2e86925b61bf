"""Privacy accounting a site owns: its ledger on disk, the accountants, and the reports."""
