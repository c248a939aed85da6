// Makes din_ext._C importable as a Python module; importing it runs the static TORCH_LIBRARY registrations.
// Not part of the standalone CMake library, which is loaded with torch.ops.load_library instead.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "din_ext compiled ops (registered in torch.ops.din_ext)",
      -1,  // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
