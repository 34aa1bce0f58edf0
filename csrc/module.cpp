// The Python module sparsegpt_kernels._C (or, built on first use by torch.utils.cpp_extension.load, the module named by
// TORCH_EXTENSION_NAME). Loading it runs the operator registrations of the other translation units.
// WITH_CUDA tells whether the CUDA implementations were compiled in; CUDA_MAX_BLOCK and n_pruned expose the rules of
// csrc/core/rules.h so that tests can compare them with their Python counterparts.
#include <Python.h>

#include "core/rules.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define SGK_CONCAT_(a, b) a##b
#define SGK_CONCAT(a, b) SGK_CONCAT_(a, b)
#define SGK_STR_(a) #a
#define SGK_STR(a) SGK_STR_(a)

namespace {

PyObject* py_n_pruned(PyObject*, PyObject* args) {
  double sparsity = 0;
  long long count = 0;
  if (!PyArg_ParseTuple(args, "dL", &sparsity, &count)) return nullptr;
  return PyLong_FromLongLong(sgk::n_pruned(sparsity, count));
}

PyMethodDef methods[] = {
    {"n_pruned", py_n_pruned, METH_VARARGS, "n_pruned(sparsity, count): weights an unstructured block prunes"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SGK_STR(TORCH_EXTENSION_NAME),
                          "sparsegpt_kernels compiled operators (torch.ops.sparsegpt_kernels.ext_*)", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC SGK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef SPARSEGPT_KERNELS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddIntConstant(mod, "CUDA_MAX_BLOCK", static_cast<long>(sgk::kCudaMaxBlock)) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
