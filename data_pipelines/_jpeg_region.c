/* Region-of-interest JPEG decoding with the libjpeg(-turbo) API: only the rows and iMCU
 * columns of one crop box, at a DCT reduction of 1, 2, 4 or 8.
 *
 * Why by hand: neither Pillow, simplejpeg nor torchvision.io expose libjpeg-turbo's
 * jpeg_skip_scanlines / jpeg_crop_scanline (the ROI decode DALI's CPU decoder uses).
 * A RandomResizedCrop view needs one box of the image: rows below it are never decoded
 * (the decode stops there), rows above it are only entropy-decoded (no IDCT, upsampling or
 * colour conversion), and columns outside it skip those stages too.
 *
 * Settings as simplejpeg's fastdct=True, fastupsample=True (JDCT_IFAST, no fancy
 * upsampling), so every output pixel depends only on its own block and chroma sample: the
 * region equals the same box of a whole-image decode with these settings (tested).
 * Corrupt-data warnings are errors (like simplejpeg's strict mode): a truncated file raises
 * instead of returning grey rows.
 *
 * decode_region(data, reduction, top, left, height, width) -> bytearray of the box's
 * height * width RGB pixels (rows of width * 3 bytes), in the coordinates of the image
 * reduced `reduction` times (whose sides are the full size's divided by it, rounded up).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

struct strict_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void error_exit(j_common_ptr cinfo) {
    struct strict_error *err = (struct strict_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void emit_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a corrupt-data warning: treat as an error */
        error_exit(cinfo);
    }
}

/* libjpeg's error manager, with errors and corrupt-data warnings jumping to err->jump. */
static struct jpeg_error_mgr *strict_errors(struct strict_error *err) {
    jpeg_std_error(&err->pub);
    err->pub.error_exit = error_exit;
    err->pub.emit_message = emit_message;
    return &err->pub;
}

static int check_reduction(int reduction) {
    if (reduction != 1 && reduction != 2 && reduction != 4 && reduction != 8) {
        PyErr_Format(PyExc_ValueError, "reduction must be 1, 2, 4 or 8, got %d", reduction);
        return 0;
    }
    return 1;
}

static void setup(struct jpeg_decompress_struct *cinfo, int reduction) {
    cinfo->out_color_space = JCS_RGB;
    cinfo->dct_method = JDCT_IFAST;
    cinfo->do_fancy_upsampling = FALSE;
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)reduction;
}

/* The rows of the region, without the GIL: errors jump back here (never across the
 * GIL release), then 0 is returned. libjpeg decodes the columns [xoffset, xoffset + wide)
 * (the region's widened to iMCU boundaries) into `scratch`; the region's own `width` columns
 * are copied out. The rows below the region are never decoded. */
static int read_rows(struct jpeg_decompress_struct *cinfo, struct strict_error *err,
                     unsigned char *pixels, unsigned char *scratch, int top, int height,
                     int skip_cols, int width) {
    if (setjmp(err->jump))
        return 0;
    if (top > 0)
        jpeg_skip_scanlines(cinfo, (JDIMENSION)top);
    JSAMPROW row[1];
    size_t stride = (size_t)width * 3;
    for (int y = 0; y < height;) {
        row[0] = scratch != NULL ? scratch : pixels + (size_t)y * stride;
        JDIMENSION got = jpeg_read_scanlines(cinfo, row, 1);
        if (got == 1 && scratch != NULL)
            memcpy(pixels + (size_t)y * stride, scratch + (size_t)skip_cols * 3, stride);
        y += (int)got;
    }
    jpeg_abort_decompress(cinfo);
    return 1;
}

static PyObject *decode_buffer(Py_buffer data, int reduction, int top, int left, int height,
                               int width);
static PyObject *decode_cropped(Py_buffer data, int reduction, int top, int left, int height,
                                int width);

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int reduction, top, left, height, width;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &reduction, &top, &left, &height, &width))
        return NULL;
    if (!check_reduction(reduction)) {
        return NULL;
    }
    PyObject *result = decode_cropped(data, reduction, top, left, height, width);
    if (result == Py_None) { /* no restart marker per MCU: the region of the whole stream */
        Py_DECREF(result);
        result = decode_buffer(data, reduction, top, left, height, width);
    }
    return result;
}

/* Decode the region of one JPEG stream (the caller releases `data`). */
static PyObject *decode_buffer(Py_buffer data, int reduction, int top, int left, int height,
                               int width) {
    struct jpeg_decompress_struct cinfo;
    struct strict_error err;
    PyObject *volatile out = NULL;
    cinfo.err = strict_errors(&err);
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        Py_XDECREF(out);
        PyErr_Format(PyExc_ValueError, "corrupt JPEG: %s", err.message);
        return NULL;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
        jpeg_destroy_decompress(&cinfo);
        PyErr_SetString(PyExc_ValueError, "unsupported colorspace (CMYK or YCCK)");
        return NULL;
    }
    setup(&cinfo, reduction);
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 ||
        (JDIMENSION)(top + height) > cinfo.output_height ||
        (JDIMENSION)(left + width) > cinfo.output_width) {
        JDIMENSION rows = cinfo.output_height, cols = cinfo.output_width;
        jpeg_destroy_decompress(&cinfo);
        PyErr_Format(PyExc_IndexError,
                     "region (top %d, left %d, height %d, width %d) outside the %ux%u image",
                     top, left, height, width, rows, cols);
        return NULL;
    }
    JDIMENSION xoffset = (JDIMENSION)left, wide = (JDIMENSION)width;
    if (wide < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &xoffset, &wide);
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
    unsigned char *scratch = NULL;
    if (out != NULL && (xoffset != (JDIMENSION)left || wide != (JDIMENSION)width)) {
        scratch = PyMem_Malloc((size_t)wide * 3);
        if (scratch == NULL) {
            Py_CLEAR(out);
            PyErr_NoMemory();
        }
    }
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = read_rows(&cinfo, &err, pixels, scratch, top, height, left - (int)xoffset, width);
    Py_END_ALLOW_THREADS
    jpeg_destroy_decompress(&cinfo);
    PyMem_Free(scratch);
    if (!ok) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "corrupt JPEG: %s", err.message);
        return NULL;
    }
    return out;
}

/* ---- Byte-level crop of a JPEG with a restart marker after every MCU ----------------
 * Each MCU's entropy-coded bytes then stand alone (the DC predictions restart), so the MCUs
 * of a region are cut out of the stream without entropy decoding the others: a new JPEG of
 * those MCUs (SOF dimensions patched, markers renumbered) decodes to exactly the pixels of
 * that part of the image (per-block IDCT, per-MCU upsampling without the fancy filter).
 * Entropy decoding, ~60 % of a full-size photo's decode, then scales with the crop's area.
 * add_restart_markers() writes such files losslessly (the DCT coefficients are copied). */

struct layout {
    size_t sof;           /* offset of the SOF marker */
    size_t entropy;       /* offset of the first entropy-coded byte */
    unsigned int height, width, mcu_h, mcu_w, mcus_per_row, mcu_rows;
};

static unsigned int be16(const unsigned char *p) { return ((unsigned int)p[0] << 8) | p[1]; }

/* The layout of a sequential, single-scan, interleaved JPEG with restart_interval 1 (as
 * add_restart_markers writes); 0 for anything else. */
static int read_layout(const unsigned char *buf, size_t len, struct layout *out) {
    size_t pos = 2, sof = 0;
    int dri_one = 0;
    unsigned int hmax = 0, vmax = 0, ncomp = 0, height = 0, width = 0;
    if (len < 4 || buf[0] != 0xFF || buf[1] != 0xD8)
        return 0;
    while (pos + 4 <= len) {
        if (buf[pos] != 0xFF)
            return 0;
        unsigned int marker = buf[pos + 1];
        if (marker == 0xFF) { /* fill byte */
            pos++;
            continue;
        }
        if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD9))
            return 0; /* a marker without a length here: not a layout this cuts */
        size_t seglen = be16(buf + pos + 2);
        if (seglen < 2 || pos + 2 + seglen > len)
            return 0;
        const unsigned char *seg = buf + pos + 4;
        if (marker == 0xC0 || marker == 0xC1) { /* baseline / extended sequential */
            if (seglen < 8 || seg[0] != 8)
                return 0;
            height = be16(seg + 1);
            width = be16(seg + 3);
            ncomp = seg[5];
            if (ncomp != 1 && ncomp != 3)
                return 0;
            if (seglen < 8 + 3 * ncomp)
                return 0;
            for (unsigned int c = 0; c < ncomp; c++) {
                unsigned int h = seg[7 + 3 * c] >> 4, v = seg[7 + 3 * c] & 15;
                hmax = h > hmax ? h : hmax;
                vmax = v > vmax ? v : vmax;
            }
            sof = pos;
        } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 &&
                   marker != 0xCC) {
            return 0; /* progressive, lossless, arithmetic: not handled */
        } else if (marker == 0xDD) {
            dri_one = seglen == 4 && be16(seg) == 1;
        } else if (marker == 0xDA) {
            if (seglen < 3 || !sof || !dri_one || seg[0] != ncomp || height == 0 || width == 0)
                return 0;
            out->sof = sof;
            out->entropy = pos + 2 + seglen;
            out->height = height;
            out->width = width;
            if (ncomp == 1) { /* one component: an MCU is one block */
                out->mcu_h = out->mcu_w = 8;
            } else {
                out->mcu_h = 8 * vmax;
                out->mcu_w = 8 * hmax;
            }
            out->mcus_per_row = (width + out->mcu_w - 1) / out->mcu_w;
            out->mcu_rows = (height + out->mcu_h - 1) / out->mcu_h;
            return 1;
        }
        pos += 2 + seglen;
    }
    return 0;
}

/* Offsets where each MCU's bytes start, and one past the last one's end (before EOI);
 * 0 if the stream does not hold exactly `count` restart intervals. */
static int find_mcus(const unsigned char *buf, size_t len, size_t start, size_t count,
                     size_t *starts, size_t *ends) {
    size_t k = 0, pos = start;
    starts[0] = start;
    while (pos + 1 < len) {
        const unsigned char *ff = memchr(buf + pos, 0xFF, len - 1 - pos);
        if (ff == NULL)
            return 0;
        size_t at = (size_t)(ff - buf);
        unsigned int next = buf[at + 1];
        if (next == 0x00) { /* stuffed byte */
            pos = at + 2;
            continue;
        }
        if (next == 0xFF) { /* fill bytes before a marker */
            pos = at + 1;
            continue;
        }
        size_t end = at;
        while (end > starts[k] && buf[end - 1] == 0xFF) /* drop fill bytes */
            end--;
        ends[k] = end;
        k++;
        if (next >= 0xD0 && next <= 0xD7) {
            if (k >= count)
                return 0;
            starts[k] = at + 2;
            pos = at + 2;
            continue;
        }
        return next == 0xD9 && k == count; /* EOI after the last MCU */
    }
    return 0;
}

/* The region from the MCUs around it (Py_None when the stream is not laid out for it). */
static PyObject *decode_cropped(Py_buffer data, int reduction, int top, int left, int height,
                                int width) {
    const unsigned char *buf = (const unsigned char *)data.buf;
    size_t len = (size_t)data.len;
    struct layout lay;
    if (!read_layout(buf, len, &lay))
        Py_RETURN_NONE;
    unsigned int rows = (lay.height + reduction - 1) / reduction;
    unsigned int cols = (lay.width + reduction - 1) / reduction;
    if (top < 0 || left < 0 || height < 1 || width < 1 || (unsigned int)(top + height) > rows ||
        (unsigned int)(left + width) > cols)
        Py_RETURN_NONE; /* decode_buffer reports it */
    size_t count = (size_t)lay.mcus_per_row * lay.mcu_rows;
    if (count > (len - lay.entropy) / 2 + 1) /* fewer bytes than restart markers: not so */
        Py_RETURN_NONE;
    size_t *starts = PyMem_Malloc(2 * count * sizeof(size_t));
    if (starts == NULL)
        return PyErr_NoMemory();
    size_t *ends = starts + count;
    if (!find_mcus(buf, len, lay.entropy, count, starts, ends)) {
        PyMem_Free(starts);
        Py_RETURN_NONE; /* decode_buffer decodes (or rejects) it */
    }
    unsigned int mh = lay.mcu_h / reduction, mw = lay.mcu_w / reduction;
    unsigned int r0 = top / mh, r1 = (top + height + mh - 1) / mh;
    unsigned int c0 = left / mw, c1 = (left + width + mw - 1) / mw;
    unsigned int sub_h = (r1 * lay.mcu_h < lay.height ? r1 * lay.mcu_h : lay.height) - r0 * lay.mcu_h;
    unsigned int sub_w = (c1 * lay.mcu_w < lay.width ? c1 * lay.mcu_w : lay.width) - c0 * lay.mcu_w;
    size_t size = lay.entropy + 2;
    for (unsigned int r = r0; r < r1; r++)
        for (unsigned int c = c0; c < c1; c++) {
            size_t k = (size_t)r * lay.mcus_per_row + c;
            size += ends[k] - starts[k] + 2;
        }
    unsigned char *sub = PyMem_Malloc(size);
    if (sub == NULL) {
        PyMem_Free(starts);
        return PyErr_NoMemory();
    }
    memcpy(sub, buf, lay.entropy);
    sub[lay.sof + 5] = (unsigned char)(sub_h >> 8);
    sub[lay.sof + 6] = (unsigned char)(sub_h & 0xFF);
    sub[lay.sof + 7] = (unsigned char)(sub_w >> 8);
    sub[lay.sof + 8] = (unsigned char)(sub_w & 0xFF);
    size_t at = lay.entropy;
    unsigned int n = 0;
    for (unsigned int r = r0; r < r1; r++)
        for (unsigned int c = c0; c < c1; c++) {
            size_t k = (size_t)r * lay.mcus_per_row + c;
            if (n > 0) { /* RST0..RST7 in sequence between MCUs */
                sub[at++] = 0xFF;
                sub[at++] = (unsigned char)(0xD0 + (n - 1) % 8);
            }
            memcpy(sub + at, buf + starts[k], ends[k] - starts[k]);
            at += ends[k] - starts[k];
            n++;
        }
    sub[at++] = 0xFF;
    sub[at++] = 0xD9;
    PyMem_Free(starts);
    Py_buffer view = {.buf = sub, .len = (Py_ssize_t)at};
    PyObject *result = decode_buffer(view, reduction, top - (int)(r0 * mh),
                                     left - (int)(c0 * mw), height, width);
    PyMem_Free(sub);
    return result;
}

/* ---- Lossless rewrite with a restart marker after every MCU ---------------------------- */

static PyObject *add_restart_markers(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct strict_error err;
    /* written by the library (its address escapes, so it lives in memory across longjmp) */
    unsigned char *mem = NULL;
    unsigned long outsize = 0;
    volatile int dst_created = 0;
    src.err = strict_errors(&err);
    jpeg_create_decompress(&src);
    if (setjmp(err.jump)) {
        if (dst_created)
            jpeg_destroy_compress(&dst);
        jpeg_destroy_decompress(&src);
        free(mem);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "corrupt JPEG: %s", err.message);
        return NULL;
    }
    jpeg_mem_src(&src, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_save_markers(&src, JPEG_COM, 0xFFFF);
    for (int m = 0; m < 16; m++)
        jpeg_save_markers(&src, JPEG_APP0 + m, 0xFFFF);
    jpeg_read_header(&src, TRUE);
    jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&src);
    dst.err = &err.pub;
    jpeg_create_compress(&dst);
    dst_created = 1;
    jpeg_mem_dest(&dst, &mem, &outsize);
    jpeg_copy_critical_parameters(&src, &dst); /* sequential output, even from progressive */
    dst.restart_interval = 1;
    dst.optimize_coding = TRUE;
    jpeg_write_coefficients(&dst, coefficients);
    for (jpeg_saved_marker_ptr m = src.marker_list; m != NULL; m = m->next) {
        if (dst.write_JFIF_header && m->marker == JPEG_APP0 && m->data_length >= 5 &&
            memcmp(m->data, "JFIF", 5) == 0)
            continue; /* written by the library already (as jpegtran does) */
        if (dst.write_Adobe_marker && m->marker == JPEG_APP0 + 14 && m->data_length >= 5 &&
            memcmp(m->data, "Adobe", 5) == 0)
            continue;
        jpeg_write_marker(&dst, m->marker, m->data, m->data_length);
    }
    jpeg_finish_compress(&dst);
    jpeg_finish_decompress(&src);
    PyObject *result = PyBytes_FromStringAndSize((const char *)mem, (Py_ssize_t)outsize);
    jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    free(mem);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, reduction, top, left, height, width) -> bytearray (h, w, 3)"},
    {"add_restart_markers", add_restart_markers, METH_VARARGS,
     "add_restart_markers(data) -> the same JPEG, losslessly, with a restart marker per MCU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_region",
    "Region-of-interest JPEG decoding with libjpeg-turbo (see the source's comment).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
