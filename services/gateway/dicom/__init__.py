"""Reading DICOM bytes safely (writing results as DICOM is ``delivery/dicom_results.py``).

    parsing.py      Part-10 bytes -> data set with bounds (deflate bombs, truncated pixel data)
    sop_classes.py  the image storage SOP classes the gateway takes (derived from PS3.3)
    conformance.py  what the gateway accepts, as the README's markdown (`bedside conformance`)

May import: security
"""
