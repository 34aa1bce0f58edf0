// The Python module sparsegpt_kernels._C. It only has to exist: loading it runs the operator registrations of the
// other translation units. WITH_CUDA tells whether the CUDA implementations were compiled in.
#include <Python.h>

namespace {
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "sparsegpt_kernels compiled operators (torch.ops.sparsegpt_kernels.ext_*)", -1, nullptr};
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef SPARSEGPT_KERNELS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
