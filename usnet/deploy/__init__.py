"""Deploying a US-Net: the plain model of one width (``plain``), its cost (``cost``), verified
files (``artifact``), the spectrum across widths (``spectrum``), and the choice of a width under a
budget (``select``) or of a per-group width by search (``search``)."""
