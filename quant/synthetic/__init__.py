"""Synthetic data: physically honest phantoms and the DICOM series they are sent as.

Forward models only, for the demo, the tests and the benchmarks: :mod:`~quant.synthetic.phantom`
(anatomy of thigh and calf, Dixon series from complex echoes), :mod:`~quant.synthetic.hand_phantom`
(a section through the palm, measured in a reader's ROIs), :mod:`~quant.synthetic.mese_phantom`
(multi-echo spin-echo trains by slice-profile EPG), :mod:`~quant.synthetic.exam` (whole exams:
Dixon, MESE classic and Enhanced MR, MEGRE magnitude and phase). These modules import the
engine; the engine never imports them.
"""
