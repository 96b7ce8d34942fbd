"""Test support, one module per helper kind: paths, net (ports, waiting for HTTP), servers (MLflow,
`liverseg serve`, stopping by PID), models (real tiny models with known behaviour), nifti (hostile and
copied NIfTI files), cli (command lines), stack (the local team stack)."""
