/*
 * fake_edgetpu.c — a real shared library that stands in for libedgetpu.so.1 in segd's tests.
 *
 * It exports the two entry points a TFLite "external delegate" plugin must have (what
 * `load_delegate('libedgetpu.so.1', {'device': 'usb:0'})` calls) and the device API of
 * libedgetpu's public C header (google-coral/libedgetpu, tflite/public/edgetpu_c.h):
 * edgetpu_list_devices / edgetpu_free_devices / edgetpu_version. Built by
 * tests/edgetpu_double/build.py with gcc under the name libedgetpu.so.1, so pointing
 * SEGD_EDGETPU_LIBRARY at it is a drop-in replacement.
 *
 * Behaviour is read from the environment at call time (so tests configure it with
 * monkeypatch.setenv, and a worker child inherits it):
 *
 *   FAKE_EDGETPU_DEVICES   comma list of TYPE:PATH (TYPE usb|pci), e.g.
 *                          "usb:/sys/bus/usb/devices/2-1,pci:/dev/apex_0"; "" = no device.
 *                          Unset = one USB device.
 *   FAKE_EDGETPU_DEVICES_FILE  if set, the same list is read from this file at every call
 *                          (a test plugs/unplugs the TPU of a running process).
 *   FAKE_EDGETPU_VERSION   string returned by edgetpu_version() (default: the compile-time
 *                          FAKE_EDGETPU_DEFAULT_VERSION, so tests can build one library per
 *                          libedgetpu build they stand in for: build.py's ``version=``).
 *   FAKE_EDGETPU_MARKER    if set, tflite_plugin_create_delegate appends a line to this file
 *                          before anything else: a test proves that load_delegate was (or
 *                          was never) reached.
 *   FAKE_EDGETPU_MODE      what tflite_plugin_create_delegate does:
 *     auto (default)  like real libedgetpu: resolve the 'device' option ("", usb, usb:N, pci,
 *                     pci:N, :N; a path is not accepted) against FAKE_EDGETPU_DEVICES; no
 *                     match -> NULL with NO error message (what libedgetpu 16 does with no
 *                     TPU). On a match the delegate (flags AllowDynamicTensors, as
 *                     libedgetpu's) claims no node, so a CPU .tflite runs unchanged and an
 *                     Edge TPU compiled one fails with "unresolved custom op".
 *     ok              same as auto (kept as the explicit name the tests use).
 *     fail            report_error(FAKE_EDGETPU_ERROR or a default sentence), return NULL.
 *     empty_error     return NULL without a message, whatever the devices.
 *     crash_on_create abort() inside tflite_plugin_create_delegate.
 *     crash_on_prepare abort() in the delegate's Prepare (interpreter construction).
 *     crash_on_invoke the delegate CLAIMS nodes (every `edgetpu-custom-op` node, else the
 *                     first builtin node that needs no scratch tensors) through
 *                     context->ReplaceNodeSubsetsWithDelegateKernels; its kernel runs the
 *                     original builtin kernel for FAKE_EDGETPU_CRASH_AFTER invocations
 *                     (default 0) and then abort()s, as libedgetpu does on a USB transfer
 *                     error.
 *     hang_on_invoke  claims like crash_on_invoke; after FAKE_EDGETPU_CRASH_AFTER good
 *                     invocations the kernel sleeps forever (a wedged device).
 *     latency         a simulated Edge TPU for benchmarks: the delegate claims every
 *                     `edgetpu-custom-op` node (nothing else); each invocation sleeps
 *                     FAKE_EDGETPU_INVOKE_MS milliseconds (default FAKE_EDGETPU_DEFAULT_INVOKE_MS,
 *                     a compile-time define, 25) and fills every output byte deterministically
 *                     from the input (out[i] = in[i mod len(in)] ^ (i mod 251)), so the answer
 *                     has the right shape and type but is not the model's: segd's TPU-vs-CPU
 *                     self-test fails on it unless relaxed for the simulator. If the device the
 *                     delegate was opened on is no longer listed (FAKE_EDGETPU_DEVICES_FILE),
 *                     the invocation fails like an unplugged TPU. In this mode edgetpu_version()
 *                     names the simulator (SIMULATED_MARK) unless FAKE_EDGETPU_VERSION is set.
 *   FAKE_EDGETPU_CRASH_AFTER  in any delegate-returning mode, setting it makes the delegate
 *                     claim a node and abort() on invocation N+1 (per process).
 *
 * The kernel cannot execute a real `edgetpu-custom-op` (that needs the TPU); when asked to, it
 * reports an error and returns kTfLiteError instead of inventing output.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#ifndef FAKE_EDGETPU_DEFAULT_INVOKE_MS
#define FAKE_EDGETPU_DEFAULT_INVOKE_MS 25
#endif
/* What segd looks for in edgetpu_version() to know the loaded library is this simulator. */
#define SIMULATED_MARK "segd-simulated-edgetpu"

/* ---- libedgetpu public C API (google-coral/libedgetpu tflite/public/edgetpu_c.h) ---------- */
enum edgetpu_device_type { EDGETPU_APEX_PCI = 0, EDGETPU_APEX_USB = 1 };
struct edgetpu_device {
  enum edgetpu_device_type type;
  const char* path;
};

/* ---- TFLite C ABI: only what this file touches --------------------------------------------
 * Copied from google-ai-edge/LiteRT tflite/core/c/common.h (main branch, 2025, which
 * ai-edge-litert 2.3 is built from; the same layouts as tensorflow/lite/core/c/common.h of
 * TF 2.16-2.20: these structs are append-only "semi-ABI stable").
 * TfLiteContext is only accessed through a pointer, so only its prefix up to
 * ReplaceNodeSubsetsWithDelegateKernels is declared. TfLiteRegistration is passed BY VALUE
 * to ReplaceNodeSubsetsWithDelegateKernels, so it is declared in full. */
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;

typedef struct TfLiteIntArray {
  int size;
  int data[];
} TfLiteIntArray;

struct TfLiteContext;
struct TfLiteDelegate;

typedef struct TfLiteNode {
  TfLiteIntArray* inputs;
  TfLiteIntArray* outputs;
  TfLiteIntArray* intermediates;
  TfLiteIntArray* temporaries;
  void* user_data;
  void* builtin_data;
  const void* custom_initial_data;
  int custom_initial_data_size;
  struct TfLiteDelegate* delegate;
  bool might_have_side_effect;
} TfLiteNode;

typedef struct TfLiteRegistration {
  void* (*init)(struct TfLiteContext* context, const char* buffer, size_t length);
  void (*free)(struct TfLiteContext* context, void* buffer);
  TfLiteStatus (*prepare)(struct TfLiteContext* context, TfLiteNode* node);
  TfLiteStatus (*invoke)(struct TfLiteContext* context, TfLiteNode* node);
  const char* (*profiling_string)(const struct TfLiteContext* context, const TfLiteNode* node);
  int32_t builtin_code;
  const char* custom_name;
  int version;
  void* registration_external; /* TfLiteOperator* */
  void* (*async_kernel)(struct TfLiteContext* context, TfLiteNode* node);
  uint64_t inplace_operator;
} TfLiteRegistration;

/* TfLiteTensor in full (the context's tensor array is indexed by it); same source. */
typedef struct TfLiteTensor {
  int type;
  void* data;
  TfLiteIntArray* dims;
  struct { float scale; int32_t zero_point; } params;
  int allocation_type;
  size_t bytes;
  const void* allocation;
  const char* name;
  struct TfLiteDelegate* delegate;
  int buffer_handle;
  bool data_is_stale;
  bool is_variable;
  struct { int type; void* params; } quantization;
  void* sparsity;
  const TfLiteIntArray* dims_signature;
} TfLiteTensor;

typedef struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(struct TfLiteContext* context, TfLiteIntArray** plan);
  TfLiteTensor* tensors;
  void* impl_;
  void* ResizeTensor;
  void (*ReportError)(struct TfLiteContext*, const char* msg, ...);
  void* AddTensors;
  TfLiteStatus (*GetNodeAndRegistration)(struct TfLiteContext*, int node_index,
                                         TfLiteNode** node, TfLiteRegistration** registration);
  TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(struct TfLiteContext*,
                                                        TfLiteRegistration registration,
                                                        const TfLiteIntArray* nodes_to_replace,
                                                        struct TfLiteDelegate* delegate);
  /* ... further members not used here ... */
} TfLiteContext;

typedef struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(TfLiteContext* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;

typedef struct TfLiteDelegateParams {
  TfLiteDelegate* delegate;
  TfLiteIntArray* nodes_to_replace;
  TfLiteIntArray* input_tensors;
  TfLiteIntArray* output_tensors;
} TfLiteDelegateParams;

enum { kTfLiteBuiltinDelegate = 51 };
/* Builtin ops (tflite/builtin_ops.h codes) whose uint8/int8 kernels need no scratch tensors:
 * ADD, AVERAGE_POOL_2D, CONCATENATION, DEPTHWISE_CONV_2D, DEQUANTIZE, MAX_POOL_2D, MUL, RELU,
 * RELU6, RESHAPE, RESIZE_BILINEAR, ARG_MAX, QUANTIZE. */
static const int kNoScratchOps[] = {0, 1, 2, 4, 6, 17, 18, 19, 21, 22, 23, 56, 114};

static bool no_scratch_op(int builtin_code) {
  for (size_t i = 0; i < sizeof kNoScratchOps / sizeof kNoScratchOps[0]; i++)
    if (kNoScratchOps[i] == builtin_code) return true;
  return false;
}
static const char kEdgeTpuCustomOp[] = "edgetpu-custom-op";

/* ---- environment --------------------------------------------------------------------------- */
static const char* env_or(const char* name, const char* fallback) {
  const char* v = getenv(name);
  return v ? v : fallback;
}

typedef struct {
  int n;
  enum edgetpu_device_type type[16];
  char path[16][256];
} DeviceList;

static void read_devices(DeviceList* out) {
  const char* spec = env_or("FAKE_EDGETPU_DEVICES", "usb:/sys/bus/usb/devices/2-1");
  /* FAKE_EDGETPU_DEVICES_FILE: the same list read from a file at every call, so a test can
   * plug and unplug the TPU of a process that is already running. */
  char from_file[1024];
  const char* file = getenv("FAKE_EDGETPU_DEVICES_FILE");
  if (file) {
    size_t n = 0;
    FILE* f = fopen(file, "r");
    if (f) {
      n = fread(from_file, 1, sizeof from_file - 1, f);
      fclose(f);
    }
    while (n > 0 && (from_file[n - 1] == '\n' || from_file[n - 1] == ' ')) n--;
    from_file[n] = '\0';
    spec = from_file;
  }
  out->n = 0;
  while (*spec && out->n < 16) {
    const char* end = strchr(spec, ',');
    size_t len = end ? (size_t)(end - spec) : strlen(spec);
    const char* colon = memchr(spec, ':', len);
    if (colon) {
      size_t tlen = (size_t)(colon - spec);
      size_t plen = len - tlen - 1;
      if (plen >= sizeof out->path[0]) plen = sizeof out->path[0] - 1;
      if (tlen == 3 && (strncmp(spec, "usb", 3) == 0 || strncmp(spec, "pci", 3) == 0)) {
        out->type[out->n] = spec[0] == 'u' ? EDGETPU_APEX_USB : EDGETPU_APEX_PCI;
        memcpy(out->path[out->n], colon + 1, plen);
        out->path[out->n][plen] = '\0';
        out->n++;
      }
    }
    spec += len;
    if (*spec == ',') spec++;
  }
}

/* Index into `devs` of the device a libedgetpu device string names, or -1. Mirrors
 * libedgetpu's tflite_plugin_create_delegate (google-coral/libedgetpu,
 * tflite/edgetpu_delegate_for_custom_op_tflite_plugin.cc):
 * "" = any; "usb"/"pci" = first of that type; ":N", "usb:N", "pci:N" = Nth in enumeration
 * order (of any type / that type); anything else (a device path included) = no device. */
static int parse_nth(const char* s, long* nth) {
  char* endp = NULL;
  *nth = strtol(s, &endp, 10);
  return endp != s && *endp == '\0' && *nth >= 0;
}

static int resolve_device(const DeviceList* devs, const char* want) {
  int type = -1; /* -1: any type */
  long nth = 0;
  if (*want == '\0') {
    nth = 0;
  } else if (*want == ':') {
    if (!parse_nth(want + 1, &nth)) return -1;
  } else if ((strncmp(want, "usb", 3) == 0 || strncmp(want, "pci", 3) == 0) &&
             (want[3] == '\0' || want[3] == ':')) {
    type = want[0] == 'u' ? EDGETPU_APEX_USB : EDGETPU_APEX_PCI;
    if (want[3] == ':' && !parse_nth(want + 4, &nth)) return -1;
  } else {
    return -1;
  }
  for (int i = 0; i < devs->n; i++)
    if ((type == -1 || (int)devs->type[i] == type) && nth-- == 0) return i;
  return -1;
}

/* ---- device API ------------------------------------------------------------------------------ */
EXPORT struct edgetpu_device* edgetpu_list_devices(size_t* num_devices) {
  DeviceList devs;
  read_devices(&devs);
  *num_devices = 0;
  if (devs.n == 0) return NULL; /* like libedgetpu: NULL and 0 when nothing is attached */
  size_t head = sizeof(struct edgetpu_device) * (size_t)devs.n, size = head;
  for (int i = 0; i < devs.n; i++) size += strlen(devs.path[i]) + 1;
  char* block = malloc(size); /* one block, paths after the array, as libedgetpu does */
  if (!block) return NULL;
  struct edgetpu_device* out = (struct edgetpu_device*)block;
  char* paths = block + head;
  for (int i = 0; i < devs.n; i++) {
    size_t len = strlen(devs.path[i]) + 1;
    memcpy(paths, devs.path[i], len);
    out[i].type = devs.type[i];
    out[i].path = paths;
    paths += len;
  }
  *num_devices = (size_t)devs.n;
  return out;
}

EXPORT void edgetpu_free_devices(struct edgetpu_device* dev) { free(dev); }

#ifndef FAKE_EDGETPU_DEFAULT_VERSION
#define FAKE_EDGETPU_DEFAULT_VERSION \
  "BuildLabel(COMPILER=gcc,DATE=fake,TIME=fake,CL_NUMBER=0), RuntimeVersion(14)"
#endif

EXPORT const char* edgetpu_version(void) {
  static char buf[256];
  const char* fallback =
      strcmp(env_or("FAKE_EDGETPU_MODE", ""), "latency") == 0
          ? "BuildLabel(" SIMULATED_MARK "), RuntimeVersion(14)"
          : FAKE_EDGETPU_DEFAULT_VERSION;
  snprintf(buf, sizeof buf, "%s", env_or("FAKE_EDGETPU_VERSION", fallback));
  return buf;
}

EXPORT void edgetpu_verbosity(int verbosity) { (void)verbosity; }

/* ---- the delegate -------------------------------------------------------------------------- */
typedef enum { MODE_AUTO, MODE_FAIL, MODE_EMPTY, MODE_CRASH_CREATE, MODE_CRASH_PREPARE,
               MODE_CRASH_INVOKE, MODE_HANG_INVOKE, MODE_LATENCY, MODE_UNKNOWN } Mode;

typedef struct {
  Mode mode;
  bool claim;
  long crash_after; /* good invocations before abort()/hang */
  int device_index;
  char device_path[256];
  long invoke_us;   /* latency mode: simulated time per invocation */
} FakeDelegate;

static void sleep_us(long us) {
  struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

static bool device_listed(const char* path) {
  DeviceList devs;
  read_devices(&devs);
  for (int i = 0; i < devs.n; i++)
    if (strcmp(devs.path[i], path) == 0) return true;
  return false;
}

/* Latency mode: what the Edge TPU would take, then deterministic bytes in every output. */
static TfLiteStatus simulate_edgetpu(TfLiteContext* context, const FakeDelegate* fd, TfLiteNode* node) {
  if (!device_listed(fd->device_path)) {
    context->ReportError(context, "fake libedgetpu: Edge TPU %s is gone (unplugged)", fd->device_path);
    return kTfLiteError;
  }
  sleep_us(fd->invoke_us);
  const TfLiteTensor* in = node->inputs->size > 0 ? &context->tensors[node->inputs->data[0]] : NULL;
  for (int o = 0; o < node->outputs->size; o++) {
    TfLiteTensor* out = &context->tensors[node->outputs->data[o]];
    unsigned char* dst = out->data;
    if (!dst) return kTfLiteError;
    for (size_t i = 0; i < out->bytes; i++) {
      unsigned char seed = in && in->data && in->bytes ? ((const unsigned char*)in->data)[i % in->bytes] : 0;
      dst[i] = (unsigned char)(seed ^ (i % 251));
    }
  }
  return kTfLiteOk;
}

static long g_invocations = 0; /* per process: a restarted worker starts counting again */

/* One claimed node, captured when the delegate kernel is created. TFLite forbids
 * GetNodeAndRegistration outside delegate preparation, and its node vector may be reallocated
 * later (other delegates add nodes), so the kernel keeps copies: the registration by value, and
 * a copy of the node header that shares the node's input/output arrays, builtin data and
 * user data (the original node stays in the graph, since TFLite keeps replaced nodes to undo
 * delegation, and is cleaned up by TFLite), with a temporaries array of its own. */
typedef struct {
  int index;
  bool edgetpu_op;
  TfLiteNode node;
  TfLiteRegistration reg;
} Claimed;

typedef struct {
  int n;
  Claimed claimed[];
} Kernel;

static bool is_edgetpu_op(const TfLiteRegistration* reg) {
  return reg->custom_name && strcmp(reg->custom_name, kEdgeTpuCustomOp) == 0;
}

static TfLiteIntArray* int_array(int size) { /* = TfLiteIntArrayCreate: malloc'ed, free()d */
  TfLiteIntArray* a = malloc(sizeof(TfLiteIntArray) + sizeof(int) * (size_t)size);
  if (a) a->size = size;
  return a;
}

static void kernel_free(TfLiteContext* context, void* buffer) {
  (void)context;
  Kernel* k = buffer;
  if (!k) return;
  for (int i = 0; i < k->n; i++) free(k->claimed[i].node.temporaries);
  free(k);
}

static void* kernel_init(TfLiteContext* context, const char* buffer, size_t length) {
  (void)length;
  const TfLiteDelegateParams* params = (const TfLiteDelegateParams*)buffer;
  int n = params->nodes_to_replace->size;
  Kernel* k = calloc(1, sizeof(Kernel) + sizeof(Claimed) * (size_t)n);
  if (!k) return NULL;
  for (int i = 0; i < n; i++) {
    Claimed* c = &k->claimed[i];
    TfLiteNode* node;
    TfLiteRegistration* reg;
    c->index = params->nodes_to_replace->data[i];
    if (context->GetNodeAndRegistration(context, c->index, &node, &reg) != kTfLiteOk) {
      kernel_free(context, k);
      return NULL;
    }
    c->node = *node;
    c->reg = *reg;
    c->edgetpu_op = is_edgetpu_op(reg);
    c->node.temporaries = int_array(0); /* ours: a kernel may free and replace it */
    k->n = i + 1;
  }
  return k;
}

/* Prepare the claimed nodes with their own kernels. Scratch ("temporary") tensors a kernel
 * adds in its prepare would not be planned by the arena for the original node (measured with
 * ai-edge-litert 2.3: they end up unallocated), so delegate_prepare only claims builtin ops that
 * use none (see kNoScratchOps). */
static TfLiteStatus kernel_prepare(TfLiteContext* context, TfLiteNode* node) {
  Kernel* k = node->user_data;
  if (!k) return kTfLiteError;
  for (int i = 0; i < k->n; i++) {
    Claimed* c = &k->claimed[i];
    if (c->edgetpu_op) continue;
    if (c->reg.prepare && c->reg.prepare(context, &c->node) != kTfLiteOk) return kTfLiteError;
  }
  return kTfLiteOk;
}

static TfLiteStatus kernel_invoke(TfLiteContext* context, TfLiteNode* node) {
  Kernel* k = node->user_data;
  const FakeDelegate* fd = node->delegate ? node->delegate->data_ : NULL;
  long n = ++g_invocations;
  if (fd && fd->crash_after >= 0 && n > fd->crash_after) {
    if (fd->mode == MODE_HANG_INVOKE) {
      for (;;) sleep(1);
    }
    fprintf(stderr, "fake libedgetpu: simulated USB transfer error on invocation %ld; aborting\n", n);
    fflush(stderr);
    abort();
  }
  for (int i = 0; i < k->n; i++) {
    Claimed* c = &k->claimed[i];
    if (c->edgetpu_op && fd && fd->mode == MODE_LATENCY) {
      if (simulate_edgetpu(context, fd, &c->node) != kTfLiteOk) return kTfLiteError;
      continue;
    }
    if (c->edgetpu_op) {
      context->ReportError(context, "fake libedgetpu (a test double) cannot execute %s node %d",
                           kEdgeTpuCustomOp, c->index);
      return kTfLiteError;
    }
    if (!c->reg.invoke || c->reg.invoke(context, &c->node) != kTfLiteOk) return kTfLiteError;
  }
  return kTfLiteOk;
}

static TfLiteStatus delegate_prepare(TfLiteContext* context, TfLiteDelegate* delegate) {
  const FakeDelegate* fd = delegate->data_;
  if (fd->mode == MODE_CRASH_PREPARE) {
    fprintf(stderr, "fake libedgetpu: aborting in delegate Prepare\n");
    fflush(stderr);
    abort();
  }
  if (!fd->claim) return kTfLiteOk; /* claim nothing: the CPU kernels run the whole graph */

  TfLiteIntArray* plan;
  if (context->GetExecutionPlan(context, &plan) != kTfLiteOk) return kTfLiteError;
  TfLiteIntArray* chosen = malloc(sizeof(TfLiteIntArray) + sizeof(int) * (size_t)(plan->size + 1));
  if (!chosen) return kTfLiteError;
  chosen->size = 0;
  int first_builtin = -1;
  for (int i = 0; i < plan->size; i++) {
    TfLiteNode* node;
    TfLiteRegistration* reg;
    if (context->GetNodeAndRegistration(context, plan->data[i], &node, &reg) != kTfLiteOk) {
      free(chosen);
      return kTfLiteError;
    }
    if (is_edgetpu_op(reg)) {
      chosen->data[chosen->size++] = plan->data[i];
    } else if (first_builtin < 0 && !node->delegate && no_scratch_op(reg->builtin_code)) {
      first_builtin = plan->data[i];
    }
  }
  if (chosen->size == 0 && first_builtin >= 0 && fd->mode != MODE_LATENCY)
    chosen->data[chosen->size++] = first_builtin;

  TfLiteRegistration reg;
  memset(&reg, 0, sizeof reg);
  reg.init = kernel_init;
  reg.free = kernel_free;
  reg.prepare = kernel_prepare;
  reg.invoke = kernel_invoke;
  reg.builtin_code = kTfLiteBuiltinDelegate;
  reg.custom_name = "FakeEdgeTpuDelegate";
  reg.version = 1;
  TfLiteStatus status =
      chosen->size ? context->ReplaceNodeSubsetsWithDelegateKernels(context, reg, chosen, delegate)
                   : kTfLiteOk;
  free(chosen);
  return status;
}

static Mode parse_mode(const char* s) {
  if (!strcmp(s, "auto") || !strcmp(s, "ok") || !*s) return MODE_AUTO;
  if (!strcmp(s, "fail")) return MODE_FAIL;
  if (!strcmp(s, "empty_error")) return MODE_EMPTY;
  if (!strcmp(s, "crash_on_create")) return MODE_CRASH_CREATE;
  if (!strcmp(s, "crash_on_prepare")) return MODE_CRASH_PREPARE;
  if (!strcmp(s, "crash_on_invoke")) return MODE_CRASH_INVOKE;
  if (!strcmp(s, "hang_on_invoke")) return MODE_HANG_INVOKE;
  if (!strcmp(s, "latency")) return MODE_LATENCY;
  return MODE_UNKNOWN;
}

EXPORT TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t num_options,
                                                     void (*report_error)(const char*)) {
  const char* marker = getenv("FAKE_EDGETPU_MARKER");
  if (marker && *marker) {
    FILE* f = fopen(marker, "a");
    if (f) {
      fprintf(f, "tflite_plugin_create_delegate pid=%ld\n", (long)getpid());
      fclose(f);
    }
  }
  /* Python's Delegate declares num_options as c_int: use only the low 32 bits. */
  size_t n = num_options & 0xffffffffu;
  const char* device = "";
  for (size_t i = 0; i < n; i++) {
    if (keys[i] && values[i] && strcmp(keys[i], "device") == 0) device = values[i];
  }
  const char* mode_name = env_or("FAKE_EDGETPU_MODE", "auto");
  Mode mode = parse_mode(mode_name);
  char msg[512];
  switch (mode) {
    case MODE_UNKNOWN:
      snprintf(msg, sizeof msg, "fake libedgetpu: unknown FAKE_EDGETPU_MODE '%s'", mode_name);
      if (report_error) report_error(msg);
      return NULL;
    case MODE_FAIL:
      snprintf(msg, sizeof msg, "%s",
               env_or("FAKE_EDGETPU_ERROR",
                      "Failed to open Edge TPU device: USB transfer error (fake libedgetpu)"));
      if (report_error) report_error(msg);
      return NULL;
    case MODE_EMPTY:
      return NULL;
    case MODE_CRASH_CREATE:
      fprintf(stderr, "fake libedgetpu: aborting in tflite_plugin_create_delegate\n");
      fflush(stderr);
      abort();
    default:
      break;
  }
  DeviceList devs;
  read_devices(&devs);
  int index = resolve_device(&devs, device);
  if (index < 0) return NULL; /* real libedgetpu: no message at all */

  FakeDelegate* fd = calloc(1, sizeof *fd);
  TfLiteDelegate* d = calloc(1, sizeof *d);
  if (!fd || !d) {
    free(fd);
    free(d);
    if (report_error) report_error("fake libedgetpu: out of memory");
    return NULL;
  }
  const char* after = getenv("FAKE_EDGETPU_CRASH_AFTER");
  fd->mode = mode;
  fd->device_index = index;
  fd->crash_after = after && *after ? strtol(after, NULL, 10) : -1;
  if ((mode == MODE_CRASH_INVOKE || mode == MODE_HANG_INVOKE) && fd->crash_after < 0) fd->crash_after = 0;
  fd->claim = fd->crash_after >= 0 || mode == MODE_LATENCY;
  snprintf(fd->device_path, sizeof fd->device_path, "%s", devs.path[index]);
  const char* ms = getenv("FAKE_EDGETPU_INVOKE_MS");
  double invoke_ms = ms && *ms ? strtod(ms, NULL) : (double)FAKE_EDGETPU_DEFAULT_INVOKE_MS;
  fd->invoke_us = invoke_ms > 0 ? (long)(invoke_ms * 1000.0) : 0;
  d->data_ = fd;
  d->Prepare = delegate_prepare;
  d->flags = 1; /* kTfLiteDelegateFlagsAllowDynamicTensors, as libedgetpu sets */
  return d;
}

EXPORT void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) {
  if (!delegate) return;
  free(delegate->data_);
  free(delegate);
}
