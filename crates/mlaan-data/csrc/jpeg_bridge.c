/*
 * The bridge between mlaan-data and the system's libjpeg-turbo (Debian: libjpeg62-turbo-dev).
 *
 * libjpeg reports fatal errors by calling error_exit, which must not return; the usual answer
 * is setjmp/longjmp. A longjmp must never cross a Rust frame, so every entry point below sets
 * its own jump target and returns 0 on failure with the message in mlaan_jpeg_message(); Rust
 * then calls mlaan_jpeg_abort() to make the object ready for the next image. Rust never sees
 * a libjpeg structure: the layout of jpeg_decompress_struct stays this file's business.
 *
 * One decode of a region:
 *   mlaan_jpeg_read_header -> mlaan_jpeg_start (scale, column crop) -> mlaan_jpeg_read_rows
 *   (skip to the first row, read the rows wanted) -> mlaan_jpeg_abort (rows below the region are
 *   never decoded; for a baseline file, never even read).
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2000000
#error "mlaan-data needs libjpeg-turbo 2.0 or newer (jpeg_crop_scanline, jpeg_skip_scanlines); on Debian install libjpeg62-turbo-dev"
#endif

struct mlaan_jpeg {
    struct jpeg_decompress_struct cinfo;
    struct jpeg_error_mgr err;
    struct jpeg_progress_mgr progress;
    jmp_buf jump;
    /* Input scans allowed before the file is refused (a crafted progressive JPEG can hold
     * thousands of scans, each a pass over the whole coefficient buffer). */
    int max_scans;
    /* libjpeg warned that the data ended early (it then pads with an end marker). */
    int truncated;
    char message[JMSG_LENGTH_MAX + 64];
};

/* What Rust needs from a header; mirrored by `RawHeader` in src/image/turbo.rs. */
struct mlaan_jpeg_header {
    uint32_t width;
    uint32_t height;
    int32_t components;
    /* 1 grey, 3 RGB (from YCbCr or RGB), 4 CMYK (from CMYK or YCCK). */
    int32_t out_channels;
    /* CMYK stored inverted, as Adobe applications write it (APP14 marker present). */
    int32_t adobe_inverted;
    int32_t progressive;
    /* Width and height of an iMCU in full-size pixels (8 times the largest sampling factor). */
    int32_t imcu_width;
    int32_t imcu_height;
};

static void on_error(j_common_ptr cinfo) {
    struct mlaan_jpeg *j = (struct mlaan_jpeg *)cinfo->client_data;
    (*cinfo->err->format_message)(cinfo, j->message);
    longjmp(j->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    struct mlaan_jpeg *j = (struct mlaan_jpeg *)cinfo->client_data;
    /* Warnings (level -1) about corrupt entropy data are ignored, as Pillow ignores them; only
     * running out of data makes the image unusable (Pillow: "image file is truncated"). */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        j->truncated = 1;
    }
}

static void on_progress(j_common_ptr cinfo) {
    struct mlaan_jpeg *j = (struct mlaan_jpeg *)cinfo->client_data;
    if (cinfo->is_decompressor) {
        int scans = ((j_decompress_ptr)cinfo)->input_scan_number;
        if (scans > j->max_scans) {
            snprintf(j->message, sizeof j->message,
                     "more than %d scans in a progressive JPEG (refused)", j->max_scans);
            longjmp(j->jump, 1);
        }
    }
}

/* jpeg_create_decompress fails only when out of memory. */
static int create(struct mlaan_jpeg *j) {
    if (setjmp(j->jump)) {
        return 0;
    }
    jpeg_create_decompress(&j->cinfo);
    return 1;
}

struct mlaan_jpeg *mlaan_jpeg_new(int max_scans) {
    struct mlaan_jpeg *j = calloc(1, sizeof *j);
    if (j == NULL) {
        return NULL;
    }
    j->max_scans = max_scans;
    j->cinfo.err = jpeg_std_error(&j->err);
    j->err.error_exit = on_error;
    j->err.emit_message = on_message;
    j->cinfo.client_data = j;
    if (!create(j)) {
        free(j);
        return NULL;
    }
    j->progress.progress_monitor = on_progress;
    j->cinfo.progress = &j->progress;
    return j;
}

void mlaan_jpeg_free(struct mlaan_jpeg *j) {
    if (j != NULL) {
        jpeg_destroy_decompress(&j->cinfo);
        free(j);
    }
}

const char *mlaan_jpeg_message(const struct mlaan_jpeg *j) { return j->message; }

int mlaan_jpeg_truncated(const struct mlaan_jpeg *j) { return j->truncated; }

/* Ends whatever decompression is under way; the object then takes a new image. Safe after an
 * error and when nothing was started. */
void mlaan_jpeg_abort(struct mlaan_jpeg *j) { jpeg_abort_decompress(&j->cinfo); }

int mlaan_jpeg_read_header(struct mlaan_jpeg *j, const uint8_t *data, size_t len,
                           struct mlaan_jpeg_header *out) {
    j->message[0] = '\0';
    j->truncated = 0;
    if (setjmp(j->jump)) {
        return 0;
    }
    jpeg_abort_decompress(&j->cinfo);
    jpeg_mem_src(&j->cinfo, data, (unsigned long)len);
    jpeg_read_header(&j->cinfo, TRUE);
    struct jpeg_decompress_struct *c = &j->cinfo;
    out->width = c->image_width;
    out->height = c->image_height;
    out->components = c->num_components;
    out->progressive = c->progressive_mode ? 1 : 0;
    out->adobe_inverted = c->saw_Adobe_marker ? 1 : 0;
    int max_h = 1, max_v = 1;
    for (int i = 0; i < c->num_components; i++) {
        if (c->comp_info[i].h_samp_factor > max_h) max_h = c->comp_info[i].h_samp_factor;
        if (c->comp_info[i].v_samp_factor > max_v) max_v = c->comp_info[i].v_samp_factor;
    }
    out->imcu_width = max_h * DCTSIZE;
    out->imcu_height = max_v * DCTSIZE;
    switch (c->jpeg_color_space) {
    case JCS_GRAYSCALE:
        out->out_channels = 1;
        break;
    case JCS_CMYK:
    case JCS_YCCK:
        out->out_channels = 4;
        break;
    case JCS_YCbCr:
    case JCS_RGB:
        out->out_channels = 3;
        break;
    default:
        snprintf(j->message, sizeof j->message,
                 "unsupported JPEG colour space with %d components", c->num_components);
        return 0;
    }
    return 1;
}

/* Starts decompression scaled by 1/denom (1, 2, 4 or 8: DCT-domain scaling), keeping output
 * columns [*x, *x + *w) of the scaled image. libjpeg moves *x left to an iMCU boundary and
 * widens *w to match; both are written back. *scaled_w / *scaled_h: size of the whole scaled
 * image. */
int mlaan_jpeg_start(struct mlaan_jpeg *j, uint32_t denom, uint32_t *x, uint32_t *w,
                     uint32_t *scaled_w, uint32_t *scaled_h) {
    if (setjmp(j->jump)) {
        return 0;
    }
    struct jpeg_decompress_struct *c = &j->cinfo;
    switch (c->jpeg_color_space) {
    case JCS_GRAYSCALE:
        c->out_color_space = JCS_GRAYSCALE;
        break;
    case JCS_CMYK:
    case JCS_YCCK:
        c->out_color_space = JCS_CMYK;
        break;
    default:
        c->out_color_space = JCS_EXT_RGB;
        break;
    }
    c->scale_num = 1;
    c->scale_denom = denom;
    /* Pillow's settings: accurate integer IDCT, smooth (fancy) chroma upsampling. */
    c->dct_method = JDCT_ISLOW;
    c->do_fancy_upsampling = TRUE;
    jpeg_start_decompress(c);
    *scaled_w = c->output_width;
    *scaled_h = c->output_height;
    if (*x >= c->output_width || *w == 0 || *x + *w > c->output_width) {
        snprintf(j->message, sizeof j->message,
                 "column range %u..%u outside the %u-pixel wide scaled image", *x, *x + *w,
                 c->output_width);
        return 0;
    }
    if (*x > 0 || *w < c->output_width) {
        JDIMENSION cx = *x, cw = *w;
        jpeg_crop_scanline(c, &cx, &cw);
        *x = cx;
        *w = cw;
    }
    return 1;
}

/* Skips to output row y and reads `rows` rows of output_width pixels each into out, `stride`
 * bytes apart. */
int mlaan_jpeg_read_rows(struct mlaan_jpeg *j, uint32_t y, uint32_t rows, uint8_t *out,
                         size_t stride) {
    if (setjmp(j->jump)) {
        return 0;
    }
    struct jpeg_decompress_struct *c = &j->cinfo;
    if (y < c->output_scanline || rows > c->output_height || y > c->output_height - rows) {
        snprintf(j->message, sizeof j->message, "rows %u..%u outside the %u decodable rows", y,
                 y + rows, c->output_height);
        return 0;
    }
    if (y > c->output_scanline) {
        jpeg_skip_scanlines(c, y - c->output_scanline);
    }
    uint32_t done = 0;
    while (done < rows) {
        JSAMPROW lines[16];
        uint32_t n = rows - done < 16 ? rows - done : 16;
        for (uint32_t i = 0; i < n; i++) {
            lines[i] = out + (size_t)(done + i) * stride;
        }
        JDIMENSION got = jpeg_read_scanlines(c, lines, n);
        if (got == 0) {
            snprintf(j->message, sizeof j->message, "decoder returned no row at row %u",
                     c->output_scanline);
            return 0;
        }
        done += got;
    }
    return 1;
}
