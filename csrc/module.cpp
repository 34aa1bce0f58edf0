// The Python module sparsegpt_kernels._C (or, built on first use by torch.utils.cpp_extension.load, the module named by
// TORCH_EXTENSION_NAME). Loading it runs the operator registrations of the other translation units.
// WITH_CUDA tells whether the CUDA implementations were compiled in; the rules of csrc/core/rules.h are exposed so
// that tests can compare them with their Python counterparts (tests/test_rules.py): the constants CUDA_MAX_BLOCK,
// MIN_QUANT_BITS and MAX_QUANT_BITS, and the functions n_pruned, valid_damp, valid_sparsity, valid_nm and valid_maxq.
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

PyObject* py_valid_damp(PyObject*, PyObject* args) {
  double damp = 0;
  if (!PyArg_ParseTuple(args, "d", &damp)) return nullptr;
  return PyBool_FromLong(sgk::valid_damp(damp));
}

PyObject* py_valid_sparsity(PyObject*, PyObject* args) {
  double sparsity = 0;
  if (!PyArg_ParseTuple(args, "d", &sparsity)) return nullptr;
  return PyBool_FromLong(sgk::valid_sparsity(sparsity));
}

PyObject* py_valid_nm(PyObject*, PyObject* args) {
  long long n = 0, m = 0;
  if (!PyArg_ParseTuple(args, "LL", &n, &m)) return nullptr;
  return PyBool_FromLong(sgk::valid_nm(n, m));
}

PyObject* py_valid_maxq(PyObject*, PyObject* args) {
  long long maxq = 0;
  if (!PyArg_ParseTuple(args, "L", &maxq)) return nullptr;
  return PyBool_FromLong(sgk::valid_maxq(maxq));
}

PyMethodDef methods[] = {
    {"n_pruned", py_n_pruned, METH_VARARGS, "n_pruned(sparsity, count): weights an unstructured block prunes"},
    {"valid_damp", py_valid_damp, METH_VARARGS, "valid_damp(damp): the relative damping is finite and > 0"},
    {"valid_sparsity", py_valid_sparsity, METH_VARARGS, "valid_sparsity(sparsity): 0 <= sparsity < 1"},
    {"valid_nm", py_valid_nm, METH_VARARGS, "valid_nm(n, m): an N:M pattern with 0 < n < m"},
    {"valid_maxq", py_valid_maxq, METH_VARARGS,
     "valid_maxq(maxq): maxq == 2**bits - 1 for bits in MIN_QUANT_BITS..MAX_QUANT_BITS"},
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
      PyModule_AddIntConstant(mod, "CUDA_MAX_BLOCK", static_cast<long>(sgk::kCudaMaxBlock)) != 0 ||
      PyModule_AddIntConstant(mod, "MIN_QUANT_BITS", static_cast<long>(sgk::kMinQuantBits)) != 0 ||
      PyModule_AddIntConstant(mod, "MAX_QUANT_BITS", static_cast<long>(sgk::kMaxQuantBits)) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
