"""Hospital integration: studies from a PACS, results back to it.

Two protocols, each through the library made for it: DICOMweb (QIDO-RS to query, WADO-RS
to retrieve, STOW-RS to store) with dicomweb-client, and DIMSE (C-FIND, C-GET or C-MOVE,
C-STORE) with pynetdicom. :mod:`medimg.pacs.pull` fetches the studies of a query into a
folder, incrementally and atomically; :mod:`medimg.pacs.listen` is a storage node that
receives studies into the inbox; :mod:`medimg.pacs.push` sends results (DICOM SEG, SR).

Files are named by keyed hashes of their UIDs (``<study key>/<instance key>.dcm``), so
no file name carries an identifier, and logs name studies by the same keys. The server is
named by its address and AE title; credentials never appear in a message.
"""
